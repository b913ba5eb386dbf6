"""Shared launcher plumbing for the Triton kernels: input checks and config selection.

Every kernel family keeps two handles on one kernel body: the plain `@triton.jit` function and an
`@triton.autotune` wrapper. On the GPU the launcher calls the autotuned one; under
TRITON_INTERPRET=1 autotune does not work, so the launcher launches one explicit config (the
first of the list, or the one a test passes in to exercise every config).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import torch
import triton

FP8_E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
# The quantization block edge of the DeepSeek checkpoints: weights 128x128, activations 1x128.
QUANT_BLOCK = 128
# amax floor, same value as dsv3_export.reference.fp8.AMAX_FLOOR: all-zero blocks get a finite scale.
AMAX_FLOOR = 1e-12


def is_interpreted(kernel: Any) -> bool:
    """True when `kernel` (a @triton.jit result) runs in the CPU interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"


_TRACING_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, k) for k in ("FAKE", "PROXY", "FUNCTIONAL"))


def tracing() -> bool:
    """True while torch.compile, make_fx or torch.export trace the caller: one of torch's tracing
    dispatch modes (FakeTensorMode, ProxyTorchDispatchMode, FunctionalTensorMode) is active, or
    dynamo runs. Other (user) dispatch modes do not count: kernels launch as they are under them.
    A few C-level reads, about a microsecond: cheap enough to ask on every launch."""
    get = torch._C._get_dispatch_mode
    return any(get(key) is not None for key in _TRACING_MODES) or torch.compiler.is_compiling()


def traceable(kernel: Any) -> Any:
    """`kernel` itself in eager mode; behind torch.library.wrap_triton only while tracing.

    wrap_triton in eager mode launches through the triton_kernel_wrapper_mutation higher-order op
    (torch's own docstring: ~1 ms): pytree flattening, a new wrapper and side-table entry per
    call, the grid evaluated for every autotune config and a grid function generated with exec.
    That was the 0.7 ms floor of every launch in the first H200 run. Worse, for an autotuner with
    a prune hook (or num_warps passed as a launch kwarg) it builds a NEW autotuner with an empty
    cache on every call, so the old fp8_gemm re-tuned all its configs on every call (0.4-1.4 s).
    While tracing (make_fx / torch.export inside torch.library.triton_op, how AOTInductor embeds
    the kernels) the wrapped form is required, so that is when it is used. Interpreted kernels
    are launched as they are, except while only fake values are computed (fake_values_only).
    """
    if not tracing():
        return kernel
    if (is_interpreted(kernel) or is_interpreted(getattr(kernel, "fn", None))) and fake_values_only():
        return _NO_LAUNCH
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is None or is_interpreted(kernel) or is_interpreted(getattr(kernel, "fn", None)):
        return kernel
    return wrap(kernel)


class _SkippedLaunch:
    """kernel[grid](*args) that launches nothing (see fake_values_only)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


_NO_LAUNCH = _SkippedLaunch()


def fake_values_only() -> bool:
    """A FakeTensorMode computes output metadata (e.g. a graph pass inserting a triton_op node) and
    nothing traces the launches. The CPU interpreter runs a kernel even on fake tensors (wrap_triton
    defers only compiled kernels), so interpreted launches are skipped then: the outputs' shapes are
    already set, their values are never read."""
    get = torch._C._get_dispatch_mode
    keys = torch._C._TorchDispatchModeKey
    return get(keys.FAKE) is not None and get(keys.PROXY) is None


def autotune_or_single(kernel: Callable, configs: Sequence[triton.Config], key: list[str], **tune_kwargs: Any):
    """The kernel wrapped in autotune for compiled runs; the bare kernel when interpreting."""
    if is_interpreted(kernel):
        return None
    return triton.autotune(configs=list(configs), key=key, **tune_kwargs)(kernel)


class LaunchSpec(NamedTuple):
    """One launch of a kernel family, as its `*_spec` function builds it from tensors already checked
    and allocated: the one place that knows the kernel's argument order. The eager launchers run it
    with launch(*spec, config); the traced lowerings (engines/torch_triton.py) through wrap_triton.
    Nothing in a spec branches on a tensor size, so sizes may be symbolic (traced)."""

    kernel: Callable
    tuned: Callable | None
    configs: Sequence[triton.Config]
    grid: Callable
    args: tuple
    kwargs: dict[str, Any]


def launch(kernel: Callable, tuned: Callable | None, configs: Sequence[triton.Config], grid: Callable,
           args: Sequence[Any], kwargs: dict[str, Any], config: triton.Config | None) -> None:
    """Launch `tuned` (autotuned on GPU) or `kernel` with an explicit config.

    `grid` is a function of the meta-parameter dict, as autotune expects.
    """
    if config is None and tuned is not None:
        traceable(tuned)[grid](*args, **kwargs)
        return
    cfg = config if config is not None else configs[0]
    meta = dict(cfg.kwargs)
    if not is_interpreted(kernel):  # the interpreter has no warps or pipeline stages
        meta.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if cfg.maxnreg:  # the register cap the autotuner timed (it sets the CTAs per SM)
            meta["maxnreg"] = cfg.maxnreg
    traceable(kernel)[grid({**kwargs, **cfg.kwargs})](*args, **kwargs, **meta)


def check_tensor(name: str, t: Any, *, dtypes: Sequence[torch.dtype] | None = None, ndim: int | None = None,
                 device: torch.device | None = None, contiguous: bool = False) -> None:
    """Raise a ValueError/TypeError that names the tensor and the broken requirement."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} not supported; expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on device {t.device}, expected {device} (same device as the first input)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); call .contiguous()")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division (triton.cdiv is a constexpr_function: several us per call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def check_blockwise_gemm(who: str, a: torch.Tensor, a_s: torch.Tensor | None, b: torch.Tensor, b_s: torch.Tensor,
                         out_dtype: torch.dtype, out_dtypes: Sequence[torch.dtype],
                         a_dtypes: Sequence[torch.dtype], a_s_any_strides: bool = False) -> tuple[int, int, int]:
    """The operand rules of a blockwise-scaled GEMM a [M, K] x b [N, K]^T (kernels/fp8_gemm.py's layouts): a of
    a_dtypes with a_s fp32 [M, ceil(K/128)] when a is fp8 (None otherwise: weight-only), b fp8 with b_s fp32
    [ceil(N/128), ceil(K/128)], unit strides along K (a_s_any_strides: except a_s, for the kernels that read it
    through both strides, e.g. outer-dim-major); errors name `who` and the tensor. Returns (M, N, K)."""
    check_tensor(f"{who}: a", a, dtypes=a_dtypes, ndim=2)
    dev = a.device
    check_tensor(f"{who}: b", b, dtypes=(FP8_DTYPE,), ndim=2, device=dev)
    check_tensor(f"{who}: b_s", b_s, dtypes=(torch.float32,), ndim=2, device=dev)
    if out_dtype not in out_dtypes:
        raise TypeError(f"{who}: out_dtype {out_dtype} not supported; expected one of {tuple(out_dtypes)}")
    m, k = a.shape
    n, k_b = b.shape
    if k_b != k:
        raise ValueError(f"{who}: a is [M={m}, K={k}] but b is [N={n}, K={k_b}]; K must match")
    k_blocks = cdiv(k, QUANT_BLOCK)
    if a.dtype == FP8_DTYPE:
        if a_s is None:
            raise ValueError(f"{who}: fp8 a needs a_s [M, ceil(K/128)]")
        check_tensor(f"{who}: a_s", a_s, dtypes=(torch.float32,), ndim=2, device=dev)
        if tuple(a_s.shape) != (m, k_blocks):
            raise ValueError(f"{who}: a_s must be [M, ceil(K/128)] = {(m, k_blocks)}, got {tuple(a_s.shape)}")
    elif a_s is not None:
        raise ValueError(f"{who}: a_s is only for fp8 a; a is {a.dtype} (the weight-only path takes a_s=None)")
    if tuple(b_s.shape) != (cdiv(n, QUANT_BLOCK), k_blocks):
        raise ValueError(f"{who}: b_s must be [ceil(N/128), ceil(K/128)] = "
                         f"{(cdiv(n, QUANT_BLOCK), k_blocks)}, got {tuple(b_s.shape)}")
    strides = {name: t.stride() for name, t in (("a", a), ("a_s", None if a_s_any_strides else a_s), ("b", b),
                                                ("b_s", b_s)) if t is not None}
    for name, st in strides.items():  # one stride() call per tensor: this runs on every decode step
        if st[1] != 1:
            raise ValueError(f"{who}: {name} needs unit stride along its last dim, got strides {st}")
    return m, n, k


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (queried once per device); a nominal 132
    (H100/H200) elsewhere."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132
