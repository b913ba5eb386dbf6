"""The torch backend: AOTInductor packages for prefill and decode, weights stored once.

Payload (engine directory):
    prefill.pt2          AOTInductor package of the prefill program (tokens [b, s]; the runtime sends it s >= 2)
    decode.pt2           AOTInductor package of the decode program (tokens [b, 1])
    weights.safetensors  every constant both packages read (parameters, rope tables), by FQN

Why two packages without weights inside: the programs share all weights, and an AOTI package
embeds its constants in its .so by default, which would store them twice (and a 16b model's
31 GB does not fit a shared library's data section). Both packages are compiled with
`package_constants_in_so=False`; the loader reads weights.safetensors once (no pickle) and hands
the same tensors to both (`load_constants(user_managed=True)`: no copy). runtime/cpp/ does the
same from C++, so the engine runs without Python.

Device: CPU packages are compiled for a named x86-64 level (engines/torch_device.py) and refuse
to load on a CPU that lacks its flags. CUDA packages embed Triton kernels (Inductor's, and ours
where engines/torch_triton.py wraps them in triton_op) for one compute capability.
CUDA graph: on CUDA, decode steps are replayed from a CUDA graph captured per (batch, cache
length, cache buffer) (`backend_info.decode_cuda_graph` says so; DSV3_TORCH_CUDA_GRAPH=0 turns it
off at load); prefill runs the package directly. CPU engines use no graphs.
`backend_info.constants` records each constant's dtype, shape and strides as compiled; both
loaders check the weights file against it. The KV cache is never inside the packages: the runtime
owns it and writes new_kv in place (dsv3_export.runtime; runtime/cpp/ for C++).
C++ compiler: checked before compiling (engines/torch_cxx.py): on the H200 machine `$CXX` linked
libstdc++ statically into shared objects, and every package it built crashed at load (std::regex in
AOTInductor's device-string parsing). `backend_info.cxx` records the compiler used and those refused.
Status (2026-11-29): CPU engines are tested (tests/engines, tests/test_cpp_runtime.py). On the
H200 (torch 2.11) the 16b bf16 and fp8 engines were built and timed with our kernels inside
(benchmarks/torch_16b.py; benchmarks/RESULTS.md, sessions 4-5). The lowerings added since (router
top-k kernel, fused RMSNorm + act_quant, and the fuse_shared_experts pass) are checked on the CPU
(interpreter, traced programs) but not yet on the GPU.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch.export import ExportedProgram

from dsv3_export.engines.base import (BackendUnavailable, BuildOutput, Progress, Target, TensorSpec, dtype_name,
                                       torch_dtype)
from dsv3_export.engines.cuda_graph_pdl import PORT_MEANINGS, PdlPlan
from dsv3_export.engines.torch_cxx import select_cxx
from dsv3_export.engines.torch_device import device_info, incompatibility
from dsv3_export.engines.torch_inductor_pdl import InductorKernels
from dsv3_export.engines.torch_lower import lower_dsv3_ops
from dsv3_export.engines.torch_step import (CUDA_GRAPH_ENV, SINGLE_THREADED_ENV, AOTIStep, constant_records, env_choice,
                                            env_flag, load_weights, save_weights)

if TYPE_CHECKING:
    from dsv3_export.manifest import Manifest
    from dsv3_export.reference.args import ModelArgs

log = logging.getLogger(__name__)

PROGRAM_KINDS = ("prefill", "decode")
PACKAGE_FILES = {"prefill": "prefill.pt2", "decode": "decode.pt2"}
WEIGHTS_FILE = "weights.safetensors"
# Kept in the manifest: a reader (runtime/cpp) refuses a layout it does not know.
PAYLOAD_LAYOUT = "aoti-packages+safetensors/1"


TRITON_OPS_ENV = "DSV3_TORCH_TRITON_OPS"


def lower_program(ep: ExportedProgram, device: str, kind: str) -> tuple[ExportedProgram, dict[str, str]]:
    """dsv3:: ops replaced: ATen math, or on CUDA our Triton kernels where torch_triton.py has them,
    with each softmax MoE router in one kernel (torch_router.py)
    (DSV3_TORCH_TRITON_OPS=0: ATen everywhere, Inductor's own kernels only; the manifest's
    `lowerings` says which, to tell our kernels' launches apart from the rest of a package)."""
    triton = None
    if device == "cuda":
        from torch.export.passes import move_to_device_pass

        from dsv3_export.engines.torch_decode_gemv import program_decode_gemv
        from dsv3_export.engines.torch_triton import triton_lowerings

        gemv = program_decode_gemv(ep, kind)
        if any(t.device.type != "cuda" for t in program_constants(ep).values()):  # build.py exports on the CPU
            ep = move_to_device_pass(ep, f"cuda:{torch.cuda.current_device()}")
        triton = triton_lowerings(kind, gemv) if env_flag(TRITON_OPS_ENV, True) else None
    if triton is None:
        return lower_dsv3_ops(ep, device, triton)
    from dsv3_export.engines.torch_attn_norm import attn_norm_into_gemv
    from dsv3_export.engines.torch_kv_row import kv_row_as_where
    from dsv3_export.engines.torch_q_rope import q_rope_into_attention
    from dsv3_export.engines.torch_router import fuse_router

    ep, router_how = fuse_router(ep, kind)
    ep, attn_norm_how = attn_norm_into_gemv(ep, kind, gemv)
    ep, kv_row_how = kv_row_as_where(ep, kind)
    lowered, how = lower_dsv3_ops(ep, device, triton)
    lowered, q_rope_how = q_rope_into_attention(lowered, kind)
    return lowered, {**how, "router": router_how, "attn_norm": attn_norm_how, "kv_row": kv_row_how,
                     "q_rope": q_rope_how}


# Inductor's combo kernels (CUDA packages): independent kernels Inductor generates side by side (the
# decode step's rope of q, rope of k, kv_norm and q_nope copy after the q/kv GEMM, each a ~1 us
# launch at batch 1) become one launch. Opt-in (DSV3_TORCH_COMBO_KERNELS=1): measured on the H200 (session 8,
# 27-layer 16b fp8 decode, with the other session-8 switches on) 82 launches fewer and 3.31 vs 3.42 ms per
# batch-1 step, but 15.3 vs 14.6 ms at batch 64.
COMBO_KERNELS_ENV = "DSV3_TORCH_COMBO_KERNELS"
COMBO_KERNELS_FORMS = {"0": "one launch per Inductor kernel", "1": "Inductor's combo kernels (horizontal fusion)"}


# Inductor's own PDL code in CUDA packages (torch's config triton.enable_pdl): its Triton kernels wait
# (griddepcontrol.wait) before they read what the kernel before them wrote, and let their dependents launch after
# their last load. The kernels whose source shows a wait before any memory access in every program
# (engines/torch_inductor_pdl.py, recorded as the package compiles) are listed in the manifest (pdl_waiting_kernels)
# beside ours, so that DSV3_TORCH_PDL's graph edit makes the edges into them programmatic too (AOTInductor launches
# without the PDL attribute: the edges cannot come from the launches). `auto` (default since session 27) on where
# our kernels wait (DSV3_TRITON_GDC) and torch has the flag; `1` the same, an error where either is missing; `0` no
# PDL code. Read when a package is compiled; decode packages only (inductor_configs). On the H200 (session 27, two
# 27-layer 16b fp8 decode builds, benchmarks/RESULTS.md) every one of the decode package's Inductor kernels passed the
# source check and the logits stayed bit-identical in every edge plan. The engine's batch-1 step: 1.724 ms (2.68x its
# floor) against 1.860 in session 26's like-for-like build (D1: no switch, same script and tune size, engine timed
# first). Between edge plans in one build (1.783 into ours and Inductor's, 1.871 into ours alone) the difference is
# within a drift of the same order (one plan read 1.724 and, later, 1.783). Without a CUDA graph (eager package calls)
# the builds ran 2.43 / 2.50 ms against 2.35-2.40 for builds without Inductor's PDL code (session 26: 2.55 and 3.47 in
# two builds with it). vLLM enables torch's flag for batch-1 decode under full CUDA graphs.
INDUCTOR_PDL_ENV = "DSV3_TORCH_INDUCTOR_PDL"
INDUCTOR_PDL_CHOICES = {"auto": "Inductor's kernels with PDL code where ours wait and torch has the flag",
                        "1": "Inductor's kernels with PDL code", "0": "no PDL code"}


def inductor_pdl_on() -> bool:
    """INDUCTOR_PDL_ENV, checked against what it needs: our kernels' wait, and a torch whose Inductor has the flag."""
    choice = env_choice(INDUCTOR_PDL_ENV, "auto", INDUCTOR_PDL_CHOICES)
    if choice == "0":
        return False
    from dsv3_export.kernels.pdl import GDC, GDC_ENV

    has_flag = hasattr(torch._inductor.config.triton, "enable_pdl")
    if choice == "auto":
        return bool(GDC) and has_flag
    if not GDC:
        raise ValueError(f"{INDUCTOR_PDL_ENV}=1 needs our kernels to wait ({GDC_ENV}=1 or auto on an sm_90+ GPU, set "
                         "before the kernels are imported): the graph edit gives programmatic edges only where every "
                         "kernel waits")
    if not has_flag:
        raise ValueError(f"{INDUCTOR_PDL_ENV}=1: this torch ({torch.__version__}) has no Inductor PDL "
                         "(torch._inductor.config.triton.enable_pdl)")
    return True


def pdl_waiting_kernels(device: str, inductor: "InductorKernels | None" = None) -> list[str]:
    """The kernels of packages built now for `device` that wait first, the graph edit's allow-list (the manifest's
    pdl_waiting_kernels): ours (kernels/pdl.py), and those of Inductor's that `inductor` recorded waiting first while
    the packages compiled (INDUCTOR_PDL_ENV); none on CPU."""
    if device != "cuda":
        return []
    from dsv3_export.kernels.pdl import waiting_kernel_names  # triton: not at import (tests/kernels/conftest.py)

    return sorted(waiting_kernel_names()) + (inductor.waiting() if inductor is not None else [])


def pdl_note(inductor: InductorKernels) -> str:
    """The manifest's `lowerings` line for a CUDA build: which kernels the decode graph edit may give programmatic
    edges (the build's switches; the runtime's port is DSV3_TORCH_PDL)."""
    from dsv3_export.kernels.pdl import GDC, GDC_ENV, GDC_TRIGGER, waiting_kernel_names

    if not GDC:
        return f"off: our kernels compiled without griddepcontrol.wait ({GDC_ENV})"
    ours = f"{len(waiting_kernel_names())} of our kernels wait first" + (
        ", then let their dependents launch" if GDC_TRIGGER else "")
    if not inductor_pdl_on():
        return f"{ours}; Inductor's kernels without PDL code ({INDUCTOR_PDL_ENV})"
    return f"{ours}; Inductor's with PDL code: {inductor.summary()}"


def inductor_configs(kind: str, info: dict[str, Any]) -> dict[str, Any]:
    configs: dict[str, Any] = {
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.metadata": {"dsv3_program": kind, "dsv3_device_kind": info["device_kind"]},
    }
    if info["device_kind"] != "cpu" and env_choice(COMBO_KERNELS_ENV, "0", COMBO_KERNELS_FORMS) == "1":
        configs["combo_kernels"] = True
    if info["device_kind"] != "cpu":
        # Every build tunes at its own export sizes (dsv3_export.export.TuneShape). Inductor's on-disk
        # autotune cache keys a kernel by its source, not by the sizes it was timed at: a package built
        # after another on the same machine took that build's choices (H200, session 11: the decode
        # kernels of builds exported at cache length 1024 kept choices timed at cache length 5).
        configs["autotune_local_cache"] = False
    if info["device_kind"] == "cpu" and info.get("march"):
        configs["cpp.march"] = info["march"]
    if info.get("cxx"):  # checked by engines/torch_cxx.py: its shared objects load next to torch
        configs["cpp.cxx"] = (None, info["cxx"]["path"])
    # decode only: its CUDA graph is the one whose edges become programmatic; elsewhere (prefill, run directly) the
    # PDL code would only cost (the no-graph timings in INDUCTOR_PDL_ENV's comment)
    if info["device_kind"] != "cpu" and kind == "decode" and inductor_pdl_on():
        configs["triton.enable_pdl"] = True
    return configs


def package_info(device: str, say: Progress | None = None) -> dict[str, Any]:
    """What the packages are compiled for (engines/torch_device.py) and with: the C++ compiler
    whose shared objects were checked to load next to torch (engines/torch_cxx.py)."""
    try:
        cxx = select_cxx()
    except RuntimeError as e:
        raise BackendUnavailable(str(e)) from None
    if say is not None:
        for compiler, why in cxx.rejected.items():
            say(f"torch: not compiling with {compiler}: {why}")
        say(f"torch: C++ compiler {cxx.path} ({cxx.version})")
    with torch._inductor.config.patch({"cpp.cxx": (None, cxx.path)}):  # Inductor's CPU ISA probe compiles too
        return {**device_info(device), "cxx": cxx.record()}


# Inner reductions of up to PERSISTENT_INNER_MAX elements (the 16b model's 2048-wide RMSNorms, looped by Inductor's
# own heuristic: 2.87 / 1.74 us per call, ~110 us per H200 batch-1 decode step) as persistent Triton kernels in CUDA
# packages (engines/torch_inductor_choices.py); the CPU's C++ kernels do not ask. On by default: on the H200 (session
# 20, 27-layer 16b fp8 decode, 4 builds against 3) 54 kernels made persistent, the two hidden-size norm kernels 53.5 +
# 37 us per batch-1 step against 69 + 44 looped (benchmarks/RESULTS.md). 4096: the most elements Inductor's
# persistent configs hold per block (torch 2.13 runtime/triton_heuristics.py MAX_PERSISTENT_BLOCK_NUMEL), one row
# per program at that width.
PERSISTENT_NORMS_ENV = "DSV3_TORCH_PERSISTENT_NORMS"
PERSISTENT_INNER_MAX = 4096
PERSISTENT_NORMS_FORMS = {
    "1": f"inner reductions of up to {PERSISTENT_INNER_MAX} elements persistent (the hidden-size RMSNorms)",
    "0": "Inductor's own persistent-reduction heuristic (inner: up to 1024 elements)"}


def persistent_norms_switch(info: Mapping[str, Any]) -> str | None:
    """DSV3_TORCH_PERSISTENT_NORMS for a package compiled for `info` (None: a CPU package, not asked)."""
    if info["device_kind"] == "cpu":
        return None
    return env_choice(PERSISTENT_NORMS_ENV, "1", PERSISTENT_NORMS_FORMS)


def persistent_norms_note(switch: str | None, promoted: Mapping[str, int]) -> str | None:
    """The manifest's `lowerings` line for the switch (None: a CPU engine)."""
    if switch is None:
        return None
    if switch == "0":
        return f"off ({PERSISTENT_NORMS_ENV}=0: {PERSISTENT_NORMS_FORMS['0']})"
    counts = ", ".join(f"{kind} {n}" for kind, n in promoted.items())
    return (f"on ({PERSISTENT_NORMS_ENV}=1): inner reductions of up to {PERSISTENT_INNER_MAX} elements persistent; "
            f"kernels made persistent that Inductor would loop: {counts}")


def _choices_handler(switch: str | None) -> contextlib.AbstractContextManager[Any]:
    """Inductor's choices for one compile: PersistentNorms with the switch on, else Inductor's own (None)."""
    if switch != "1":
        return contextlib.nullcontext(None)
    from dsv3_export.engines.torch_inductor_choices import persistent_norms  # imports triton

    return persistent_norms(PERSISTENT_INNER_MAX)


def compile_package(ep: ExportedProgram, kind: str, path: Path, info: dict[str, Any],
                    promoted: dict[str, int] | None = None, inductor: "InductorKernels | None" = None) -> Path:
    """AOTInductor-compile one (lowered) program into a .pt2 package without its weights.
    promoted: where a CUDA package compiled with DSV3_TORCH_PERSISTENT_NORMS=1 records promoted[kind], the
    number of kernels made persistent that Inductor would have looped (engines/torch_inductor_choices.py).
    inductor: where a package compiled with Inductor's PDL code (inductor_configs: CUDA decode packages, where
    INDUCTOR_PDL_ENV is on) records its kernels (pdl_waiting_kernels)."""
    from dsv3_export.engines.torch_int_arrays import unique_int_array_writers

    choices_handler = _choices_handler(persistent_norms_switch(info))
    configs = inductor_configs(kind, info)
    recorder = contextlib.nullcontext()
    if inductor is not None and configs.get("triton.enable_pdl"):
        from dsv3_export.engines.torch_inductor_pdl import recording

        recorder = recording(inductor)
    # unique_int_array_writers: engines/torch_int_arrays.py
    with unique_int_array_writers(), choices_handler as choices, recorder:
        out = torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs)
    if choices is not None:
        log.info("torch: %s package: %d kernels made persistent by %s=1", kind, len(choices.promoted),
                 PERSISTENT_NORMS_ENV)
        if promoted is not None:
            promoted[kind] = len(choices.promoted)
    return Path(out)


def program_constants(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """The tensors the program's graph reads that are not user inputs, by FQN (parameters, buffers,
    lifted constants), without the unused ones (the reference model's own KV-cache buffers)."""
    from torch.export.graph_signature import InputKind

    values = {**ep.state_dict, **ep.constants}
    used = {n.name for n in ep.graph.nodes if n.op == "placeholder" and n.users}
    out = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR) \
                and spec.arg.name in used and isinstance(values.get(spec.target), torch.Tensor):
            out[spec.target] = values[spec.target]
    return out


def _collect_weights(weights: dict[str, torch.Tensor], ep: ExportedProgram) -> None:
    """Add the program's constants to `weights` (both programs share names; shapes must agree).

    Not from loading the package: the build machine need not be able to load it (torch 2.11's
    Python loader crashed on CUDA packages, see engines/torch_step.py); the loaders check that
    every constant a package asks for is in the file.
    """
    for fqn, t in program_constants(ep).items():
        if fqn in weights and (weights[fqn].shape != t.shape or weights[fqn].dtype != t.dtype
                               or weights[fqn].stride() != t.stride()):
            raise ValueError(f"torch backend: constant {fqn!r} differs between programs "
                             f"({tuple(weights[fqn].shape)} {weights[fqn].dtype} stride {weights[fqn].stride()} vs "
                             f"{tuple(t.shape)} {t.dtype} stride {t.stride()})")
        weights.setdefault(fqn, t)


def _input_dtype(ep: ExportedProgram, name: str) -> torch.dtype:
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user and node.name == name:
            return node.meta["val"].dtype
    raise ValueError(f"torch backend: program has no user input {name!r} (inputs: {user})")


def _aten_histogram(programs: Mapping[str, ExportedProgram]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ep in programs.values():
        for node in ep.graph.nodes:
            if node.op == "call_function":
                name = getattr(node.target, "__name__", str(node.target))
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


# Programmatic edges in the decode CUDA graph (engines/cuda_graph_pdl.py), read when an engine loads:
# "programmatic" (default) for the kernels the manifest lists as waiting first (engines built where they do not
# wait list none and keep the captured graph); "launch" (slower on the H200: sessions 18, 25 and 26); "0" leaves the
# graph as captured. Timings in kernels/pdl.py GDC_ENV's comment.
PDL_ENV = "DSV3_TORCH_PDL"
PDL_CHOICES = {"0": "edges as captured", **PORT_MEANINGS}
PDL_DEFAULT = "programmatic"


def decode_pdl(info: Mapping[str, Any]) -> PdlPlan | None:
    """The decode graphs' programmatic edges: DSV3_TORCH_PDL's port over the kernels the manifest records as
    waiting first (engines built before that record get none: their kernels may not wait)."""
    port = env_choice(PDL_ENV, PDL_DEFAULT, PDL_CHOICES)
    waiting = info.get("pdl_waiting_kernels") or []
    return PdlPlan(port, frozenset(waiting)) if port != "0" and waiting else None


def decode_cuda_graph(info: Mapping[str, Any]) -> bool:
    """Whether decode replays CUDA graphs: the manifest says so and DSV3_TORCH_CUDA_GRAPH is not 0."""
    return bool(info.get("decode_cuda_graph")) and env_flag(CUDA_GRAPH_ENV, True)


class TorchBackend:
    name = "torch"
    program_kinds = PROGRAM_KINDS

    def check_target(self, target: Target) -> str | None:
        if target.device == "cuda" and not torch.cuda.is_available():
            return "torch backend: --device cuda needs a CUDA GPU visible to torch (torch.cuda.is_available() is False)"
        try:  # before the export, which takes minutes at 16b; the check is cached for package_info
            select_cxx()
        except RuntimeError as e:
            return str(e)
        return None

    def build(self, programs: Mapping[str, ExportedProgram], args: "ModelArgs", target: Target,
              out_dir: Path, progress: Progress | None = None) -> BuildOutput:
        say = progress or (lambda message: None)
        reason = self.check_target(target)
        if reason:
            raise BackendUnavailable(reason)
        missing = [k for k in PROGRAM_KINDS if k not in programs]
        if missing:
            raise ValueError(f"torch backend: needs programs {PROGRAM_KINDS}, missing {missing}")
        info = package_info(target.device, say)
        lowered: dict[str, ExportedProgram] = {}
        lowerings: dict[str, str] = {}
        weights: dict[str, torch.Tensor] = {}
        promoted: dict[str, int] = {}
        inductor = InductorKernels()
        for kind in PROGRAM_KINDS:
            ep, how = lower_program(programs[kind], target.device, kind)
            lowered[kind], lowerings = ep, {**lowerings, **how}
            say(f"torch: AOTInductor compiling {kind} for {target.device} "
                f"({info.get('march') or info.get('compute_capability') or 'native'})")
            compile_package(ep, kind, out_dir / PACKAGE_FILES[kind], info, promoted, inductor)
            _collect_weights(weights, ep)
        note = persistent_norms_note(persistent_norms_switch(info), promoted)
        if note:
            lowerings["persistent_norms"] = note
        if target.device == "cuda":
            lowerings["pdl"] = pdl_note(inductor)
        say(f"torch: writing {WEIGHTS_FILE} ({len(weights)} tensors)")
        save_weights(weights, out_dir / WEIGHTS_FILE)
        cache_dtype = _input_dtype(lowered["decode"], "kv_cache")
        width = args.latent_cache_width
        cd = dtype_name(cache_dtype)
        inputs = [TensorSpec("tokens", "int64", ("batch", "seq")), TensorSpec("start_pos", "int64", ("batch",)),
                  TensorSpec("kv_cache", cd, ("batch", args.n_layers, "cache_len", width))]
        outputs = [TensorSpec("logits", "float32", ("batch", "seq", args.vocab_size)),
                   TensorSpec("new_kv", cd, ("batch", args.n_layers, "seq", width))]
        extra = {
            **info,
            "layout": PAYLOAD_LAYOUT,
            "packages": dict(PACKAGE_FILES),
            "weights": WEIGHTS_FILE,
            "decode_cuda_graph": target.device == "cuda",
            "pdl_waiting_kernels": pdl_waiting_kernels(target.device, inductor),
            # what the packages were compiled for; the loader checks the weights file against it
            "constants": constant_records(weights),
            "dispatch": "tokens.shape[1] == 1 -> decode package, else prefill package",
        }
        return BuildOutput(files=[*PACKAGE_FILES.values(), WEIGHTS_FILE], inputs=inputs, outputs=outputs,
                           cache_dtype=cd, lowerings=lowerings, op_histogram=_aten_histogram(lowered), extra=extra)

    def load(self, engine_dir: Path, manifest: "Manifest") -> AOTIStep:
        info = dict(manifest.backend_info)
        if info.get("layout") != PAYLOAD_LAYOUT:
            raise BackendUnavailable(f"{engine_dir}: torch payload layout {info.get('layout')!r} is not "
                                     f"{PAYLOAD_LAYOUT!r}; rebuild the engine with this dsv3-export")
        reason = incompatibility(info)
        if reason:
            raise BackendUnavailable(f"{engine_dir}: cannot run this torch engine here: {reason}")
        device = torch.device(info["device_kind"])
        weights = load_weights(Path(engine_dir) / info["weights"], device)
        packages = {kind: Path(engine_dir) / name for kind, name in info["packages"].items()}
        cache_dtype = torch_dtype(manifest.kv_cache["dtype"])
        return AOTIStep.from_packages(packages, weights, device, cache_dtype,
                                      cuda_graph=decode_cuda_graph(info), constants=info.get("constants"),
                                      single_threaded=env_flag(SINGLE_THREADED_ENV, True), pdl=decode_pdl(info))


BACKEND = TorchBackend()
