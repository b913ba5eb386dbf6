"""What machine an AOTInductor package was built for, and whether this machine can run it.

Why: an AOTI package is native code. On CPU Inductor compiles for one vector ISA (AVX512, AVX2,
...) and, by default, with -march=native, so a package built on one CPU can die with SIGILL on
another. On CUDA the embedded Triton kernels are cubins for one compute capability. The torch
backend therefore compiles CPU packages for a named x86-64 level (x86-64-v4 with AVX512,
x86-64-v3 with AVX2) instead of `native`, records the exact CPU flags that level and the vector
ISA need (names as /proc/cpuinfo spells them) or the compute capability, and the Python and C++
loaders refuse a mismatch with a message naming what is missing. runtime/cpp/ reads the same
manifest keys ("device_kind", "cpu_flags_required", "compute_capability").
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

# /proc/cpuinfo flag names of the x86-64 micro-architecture levels (psABI). "pni" is SSE3,
# "abm" is LZCNT.
X86_64_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3")
X86_64_V3 = (*X86_64_V2, "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
X86_64_V4 = (*X86_64_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
# Inductor vector-ISA word -> (-march level, flags the level implies).
_ISA_LEVELS = {"avx512": ("x86-64-v4", X86_64_V4), "avx2": ("x86-64-v3", X86_64_V3)}


def cpu_flags() -> set[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (x86 "flags", Arm "Features")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_isa() -> str:
    """Inductor's choice of vector ISA on this machine, e.g. "avx512 avx512_vnni" ("" if none)."""
    from torch._inductor import cpu_vec_isa

    return str(cpu_vec_isa.pick_vec_isa())


def cpu_target(isa: str | None = None) -> tuple[str | None, list[str]]:
    """(-march value to compile with, or None to keep Inductor's default; required cpuinfo flags)."""
    isa = cpu_isa() if isa is None else isa
    words = isa.split()
    if platform.machine() not in ("x86_64", "AMD64") or not words or words[0] not in _ISA_LEVELS:
        # Not a level we can name: keep -march=native and require every flag of this CPU.
        return None, sorted(cpu_flags())
    march, flags = _ISA_LEVELS[words[0]]
    extra = [w for w in words[1:]]  # e.g. avx512_vnni: same spelling in /proc/cpuinfo
    return march, sorted({*flags, *extra})


def device_info(device: str, isa: str | None = None) -> dict[str, Any]:
    """The manifest's record of the machine kind a package is built for."""
    if device == "cpu":
        march, flags = cpu_target(isa)
        return {"device_kind": "cpu", "machine": platform.machine(), "cpu_isa": cpu_isa() if isa is None else isa,
                "march": march, "cpu_flags_required": flags, "compute_capability": None}
    major, minor = torch.cuda.get_device_capability()
    return {"device_kind": "cuda", "machine": platform.machine(), "cpu_isa": None, "march": None,
            "cpu_flags_required": [], "compute_capability": f"{major}.{minor}",
            "device_name": torch.cuda.get_device_name()}


def incompatibility(info: dict[str, Any]) -> str | None:
    """None when this machine can run a package described by `info`, else why not."""
    kind = info.get("device_kind")
    if kind not in ("cpu", "cuda"):
        return f"manifest backend_info.device_kind is {kind!r}, expected 'cpu' or 'cuda'"
    machine = info.get("machine")
    if machine and machine != platform.machine():
        return f"the engine was built for {machine} CPUs, this machine is {platform.machine()}"
    if kind == "cpu":
        missing = sorted(set(info.get("cpu_flags_required", [])) - cpu_flags())
        if missing:
            return (f"the engine was compiled for CPU ISA {info.get('cpu_isa')!r} (-march={info.get('march')}); "
                    f"this CPU lacks {', '.join(missing)}: rebuild the engine on this machine")
        return None
    if not torch.cuda.is_available():
        return "the engine was built for CUDA but torch sees no CUDA device here"
    want = info.get("compute_capability")
    major, minor = torch.cuda.get_device_capability()
    have = f"{major}.{minor}"
    if want != have:
        return (f"the engine's kernels were built for compute capability {want}, this GPU "
                f"({torch.cuda.get_device_name()}) is {have}: rebuild the engine on this GPU")
    return None
