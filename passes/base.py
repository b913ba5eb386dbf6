"""What every pass takes and returns.

A pass is a plain function `pass_fn(program, config) -> PassResult`. It never mutates its input
program in a way the caller could observe after a failure: on error it raises PassError naming
the pass, the node and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.export import ExportedProgram


class PassError(RuntimeError):
    """A pass met input it cannot handle. The message names the pass, the node and why."""

    def __init__(self, pass_name: str, reason: str, node: str | None = None):
        where = f" at node {node!r}" if node else ""
        super().__init__(f"pass {pass_name}{where}: {reason}")
        self.pass_name, self.node, self.reason = pass_name, node, reason


@dataclass(frozen=True)
class PassConfig:
    """Settings shared by the passes (mirrors the CLI's build flags)."""

    precision: str = "fp32"  # "fp32" | "bf16" | "fp8"
    # Modules kept in high precision by quantize_fp8_blockwise (name substrings, checkpoint names).
    fp8_skip: tuple[str, ...] = ("embed", "gate", "norm", "head")
    fp8_activations: bool = True  # dynamic 1x128 activation quantization in dsv3::fp8_linear
    block_size: int = 128
    debug: bool = False  # log near-misses (why a candidate did not match)


@dataclass
class PassResult:
    program: ExportedProgram
    matches: int  # how many sites the pass rewrote (0: nothing to do)
    notes: list[str] = field(default_factory=list)  # near-misses and remarks, for --dump-graphs / debug logs
