"""The scan-match-rewrite skeleton the site passes share (rewrite_moe_grouped_gemm, fuse_shared_experts).

    sites, notes = scan_sites(state, is_candidate, match, "not rewritten")
    obsolete = apply_rewrites(state, sites, rewrite, PASS, "per-expert tensors")

One linear scan: `match(state, node)` returns a site or the one-line reason the candidate is not
one (a near-miss note). Every rewrite runs before dead code is removed, so a rewrite may still
read nodes another one made dead; then the tensors the rewrites made obsolete are dropped, and
one still in use is an error naming it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.fx import Node

from dsv3_export.passes.base import PassError
from dsv3_export.passes.program_state import ProgramState


def scan_sites(state: ProgramState, is_candidate: Callable[[Node], bool],
               match: Callable[[ProgramState, Node], Any], skipped: str) -> tuple[list, list[str]]:
    """(sites, notes): match() of each candidate node, in graph order; a str result is a near-miss."""
    sites, notes = [], []
    for node in state.graph.nodes:
        if node.op == "call_function" and is_candidate(node):
            found = match(state, node)
            if isinstance(found, str):
                notes.append(f"{node.name}: {skipped}: {found}")
            else:
                sites.append(found)
    return sites, notes


def apply_rewrites(state: ProgramState, sites: list, rewrite: Callable[[ProgramState, Any], list[str]],
                   pass_name: str, what: str) -> list[str]:
    """rewrite(state, site) for each site (returns the names of the tensors it made obsolete), then
    dead code and those tensors are removed; returns their names."""
    obsolete = []
    with torch.no_grad():
        for site in sites:
            obsolete += rewrite(state, site)
    state.eliminate_dead_code()
    kept = set(obsolete) - set(state.remove_if_unused(obsolete))
    if kept:
        raise PassError(pass_name, f"{what} still used after the rewrite: {sorted(kept)[:4]}")
    return obsolete
