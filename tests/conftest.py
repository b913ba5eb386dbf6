"""Shared fixtures and the tolerance table used across the suite."""

from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist each worker gets one intra-op thread, and so do the programs it starts
# (C++ runtime, CLI subprocesses, AOTInductor CPU packages through OpenMP): with 2 workers on
# 2 cores, 2 threads each oversubscribe the machine, and OpenMP's spin-waits then made one tiny
# decode step take 0.6-0.9 s instead of ~11 ms (session 14). Outside xdist nothing changes.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _shared_builds(tmp_path_factory):
    """Lets helpers share builds between xdist workers without a fixture of their own (tests/_shared_build.py)."""
    from tests._shared_build import remember_factory

    remember_factory(tmp_path_factory)


# One table of tolerances: relative error ||a - b|| / ||b|| unless said otherwise.
TOLERANCES = {
    "fp32_structural": 1e-5,  # two formulations of the same math in fp32 (naive vs absorb, passes)
    "fp32_engine": 1e-4,  # an engine (other kernels, other summation order) vs the reference
    "bf16": 2e-2,
}


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens by the reference model's own decoding (prefill, then one token at a time
    through its buffer cache): dsv3_export.reports.reference.reference_generate for one prompt."""
    from dsv3_export.reports.reference import reference_generate

    return reference_generate(model, [prompt], max_new_tokens)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run (printed on failure through the test id's output)."""
    s = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(torch.seed())).item())
    print(f"seed={s}")
    return s
