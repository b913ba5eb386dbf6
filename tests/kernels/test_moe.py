"""moe_align / grouped_gemm / fused_moe vs per-expert torch loops."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: kernel tests need it (TRITON_INTERPRET=1 on CPU)")

from dsv3_export.kernels._common import LaunchSpec  # noqa: E402
from dsv3_export.kernels import moe as M  # noqa: E402
from dsv3_export.reference import fp8 as R  # noqa: E402
from dsv3_export.reference.args import ModelArgs  # noqa: E402
from dsv3_export.reference.moe import MoE  # noqa: E402
from tests.kernels._helpers import TOL, assert_finite, mean_rel  # noqa: E402

E, D, I = 8, 200, 96  # I < 128: the [gate; up] rows straddle a 128-row scale block
QUANT_K = 128  # the activation scale block


def _routing(t: int, k: int, e: int = E):
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])  # distinct experts per token
    weights = torch.rand(t, k)
    return ids, weights / weights.sum(-1, keepdim=True)


def _weights(dtype):
    w13 = (torch.randn(E, 2 * I, D) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, I) / I**0.5).to(dtype)
    return w13, w2


def _quantize_experts(w):
    qs, ss = zip(*(R.weight_quant(w[e].float()) for e in range(w.shape[0])))
    return torch.stack(qs), torch.stack(ss)


@pytest.mark.parametrize("t,k,block_m", [(1, 6, 16), (37, 3, 16), (37, 3, 32), (5, 2, 64)])
def test_moe_align_invariants(seed, t, k, block_m):
    torch.manual_seed(seed)
    ids, _ = _routing(t, k)
    sorted_ids, expert_ids, npp = M.moe_align(ids, E, block_m)
    numel = t * k
    n_blocks = -(-(numel + E * (block_m - 1)) // block_m)
    assert sorted_ids.dtype == expert_ids.dtype == npp.dtype == torch.int32
    assert sorted_ids.shape == (n_blocks * block_m,) and expert_ids.shape == (n_blocks,) and npp.shape == (1,)
    counts = torch.bincount(ids.flatten(), minlength=E)
    assert npp.item() == int(((counts + block_m - 1) // block_m * block_m).sum())
    used = sorted_ids[: npp.item()]
    real = used[used < numel]
    assert torch.equal(real.sort().values, torch.arange(numel, dtype=torch.int32)), "each assignment exactly once"
    assert (sorted_ids[npp.item():] == numel).all() and (used[used >= numel] == numel).all()
    blocks = used.view(-1, block_m)  # [used blocks, block_m]
    for b, row in enumerate(blocks):
        valid = row[row < numel].long()
        assert valid.numel() > 0, "no block is pure padding"
        assert (ids.flatten()[valid] == expert_ids[b]).all(), f"block {b} mixes experts"
    assert (expert_ids[blocks.shape[0]:] == -1).all()


@pytest.mark.parametrize("t,k,e,block_m,idtype", [
    (1, 6, 64, 16, torch.int64),  # decode: 6 of 64 experts
    (37, 3, 8, 32, torch.int32),
    (300, 6, 64, 64, torch.int64),  # several CHUNK tiles
    (2900, 6, 64, 16, torch.int32),  # > 1024 blocks: several FILL tiles of slots and of block experts
    (5, 2, 3, 16, torch.int64),  # E not a power of 2
    (0, 6, 64, 64, torch.int64),  # no tokens: the parallel form's one slice writes the sentinels
    (1024, 2, 100, 64, torch.int32),  # E=100 (BLOCK_E 128, CHUNK 64): exactly 32 full slices, one offsets step
])
@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
def test_moe_align_kernel_equals_aten_form(seed, t, k, e, block_m, idtype, parallel):
    """The single-program and the parallel kernels (eager) and the ATen form (traced) give identical outputs; the
    parallel form with several slices (T*k > 128 at E=64) and, at T=2900, more slices than one offsets step."""
    torch.manual_seed(seed)
    ids = torch.randint(0, e, (t, k), dtype=idtype)
    if t:
        ids[0, :] = e - 1  # an expert with several assignments from one token; others may get none
    got = M.moe_align(ids, e, block_m, parallel=parallel)
    ref = M.moe_align_ref(ids, e, block_m)
    for name, a, b in zip(("sorted_token_ids", "expert_ids", "num_tokens_post_pad"), got, ref):
        assert a.dtype == b.dtype == torch.int32 and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: {int((a != b).sum())} entries differ"
    strided = M.moe_align(ids.t().contiguous().t(), e, block_m, parallel=parallel)  # a non-contiguous [T, k] view
    assert all(torch.equal(a, b) for a, b in zip(strided, ref))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, "grouped_gemm_fp16"), (torch.bfloat16, "grouped_gemm_bf16")])
@pytest.mark.parametrize("swiglu,weighted", [(False, False), (True, False), (False, True)])
def test_grouped_gemm_dense(seed, dtype, tol, swiglu, weighted):
    torch.manual_seed(seed)
    t, k = 37, 3
    ids, rw = _routing(t, k)
    x = torch.randn(t, D, dtype=dtype)
    w13, _ = _weights(dtype)
    s_ids, e_ids, npp = M.moe_align(ids, E, 16)
    tw = rw if weighted else None
    out = M.grouped_gemm(x, w13, s_ids, e_ids, npp, k, topk_weights=tw, fuse_swiglu=swiglu,
                         out_dtype=torch.float32)
    ref = M.grouped_gemm_ref(x, w13, ids, k, topk_weights=tw, fuse_swiglu=swiglu)
    assert out.shape == (t * k, I if swiglu else 2 * I)
    assert_finite("grouped_gemm", out)
    assert mean_rel(out, ref) < TOL[tol]


@pytest.mark.parametrize("swiglu", [False, True])
def test_grouped_gemm_fp8_same_quantized_inputs(seed, swiglu):
    torch.manual_seed(seed)
    t, k = 11, 3
    ids, rw = _routing(t, k)
    xq, xs = R.act_quant(torch.randn(t, D))
    w13q, w13s = _quantize_experts(_weights(torch.float32)[0])
    s_ids, e_ids, npp = M.moe_align(ids, E, 16)
    out = M.grouped_gemm(xq, w13q, s_ids, e_ids, npp, k, a_scale=xs, w_scale=w13s, topk_weights=rw,
                         fuse_swiglu=swiglu, out_dtype=torch.float32)
    ref = M.grouped_gemm_ref(xq, w13q, ids, k, a_scale=xs, w_scale=w13s, topk_weights=rw, fuse_swiglu=swiglu)
    assert_finite("grouped_gemm fp8", out)
    assert mean_rel(out, ref) < TOL["fp8_gemm_fp32_out"]


@pytest.mark.parametrize("config", M.GROUPED_GEMM_CONFIGS, ids=str)
def test_grouped_gemm_every_config(seed, config):
    torch.manual_seed(seed)
    t, k = 9, 2
    ids, rw = _routing(t, k)
    x = torch.randn(t, D, dtype=torch.float16)
    w13, _ = _weights(torch.float16)
    s_ids, e_ids, npp = M.moe_align(ids, E, 16)
    out = M.grouped_gemm(x, w13, s_ids, e_ids, npp, k, fuse_swiglu=True, out_dtype=torch.float32, config=config)
    assert mean_rel(out, M.grouped_gemm_ref(x, w13, ids, k, fuse_swiglu=True)) < TOL["grouped_gemm_fp16"]


@pytest.mark.parametrize("t", [1, 37])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, "fused_moe_fp16"), (torch.bfloat16, "fused_moe_bf16")])
def test_fused_moe_dense(seed, t, dtype, tol):
    torch.manual_seed(seed)
    ids, rw = _routing(t, 3)
    x = torch.randn(t, D, dtype=dtype)
    w13, w2 = _weights(dtype)
    y = M.fused_moe(x, w13, w2, rw.to(dtype), ids)
    assert y.shape == (t, D) and y.dtype == dtype
    assert_finite("fused_moe", y)
    assert mean_rel(y, M.fused_moe_ref(x, w13, w2, rw.to(dtype), ids)) < TOL[tol]


@pytest.mark.parametrize("t", [1, 19])
def test_fused_moe_fp8(seed, t):
    torch.manual_seed(seed)
    ids, rw = _routing(t, 3)
    x = torch.randn(t, D, dtype=torch.float16)
    w13, w2 = _weights(torch.float32)
    (w13q, w13s), (w2q, w2s) = _quantize_experts(w13), _quantize_experts(w2)
    y = M.fused_moe(x, w13q, w2q, rw, ids, w13_scale=w13s, w2_scale=w2s)
    ref = M.fused_moe_ref(x, w13q, w2q, rw, ids, w13_scale=w13s, w2_scale=w2s)
    assert_finite("fused_moe fp8", y)
    assert mean_rel(y, ref) < TOL["fused_moe_fp8_fp16"]


@pytest.mark.parametrize("swiglu", [False, True])
def test_grouped_gemm_weight_only_fp8(seed, swiglu):
    torch.manual_seed(seed)
    t, k = 11, 3
    ids, rw = _routing(t, k)
    x = torch.randn(t, D, dtype=torch.float16)
    w13q, w13s = _quantize_experts(_weights(torch.float32)[0])
    s_ids, e_ids, npp = M.moe_align(ids, E, 16)
    out = M.grouped_gemm(x, w13q, s_ids, e_ids, npp, k, w_scale=w13s, topk_weights=rw, fuse_swiglu=swiglu,
                         out_dtype=torch.float32)
    ref = M.grouped_gemm_ref(x, w13q, ids, k, w_scale=w13s, topk_weights=rw, fuse_swiglu=swiglu)
    assert_finite("grouped_gemm weight-only", out)
    assert mean_rel(out, ref) < TOL["grouped_gemm_fp16"]


def test_fused_moe_weight_only_fp8(seed):
    torch.manual_seed(seed)
    ids, rw = _routing(9, 3)
    x = torch.randn(9, D, dtype=torch.float16)
    w13, w2 = _weights(torch.float32)
    (w13q, w13s), (w2q, w2s) = _quantize_experts(w13), _quantize_experts(w2)
    kw = dict(w13_scale=w13s, w2_scale=w2s, act_quant=False)
    y = M.fused_moe(x, w13q, w2q, rw, ids, **kw)
    assert mean_rel(y, M.fused_moe_ref(x, w13q, w2q, rw, ids, **kw)) < TOL["fused_moe_fp16"]


def test_fused_moe_matches_reference_moe_module(seed):
    # The reference MoE (DeepSeek's per-expert loop, fp32) on the tiny preset: routed part only.
    torch.manual_seed(seed)
    args = ModelArgs.preset("tiny")
    moe = MoE(args)
    for p in moe.parameters():
        p.normal_(0, args.dim**-0.5)
    x = torch.randn(13, args.dim)
    weights, ids = moe.gate(x)
    routed_ref = moe.forward_loop(x)
    w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in moe.experts]).half()  # [E, 2I, D]
    w2 = torch.stack([e.w2.weight for e in moe.experts]).half()  # [E, D, I]
    y = M.fused_moe(x.half(), w13, w2, weights.half(), ids)
    assert mean_rel(y, routed_ref) < TOL["fused_moe_vs_model"]


def test_bad_inputs_name_the_problem():
    ids, rw = _routing(4, 2)
    x = torch.randn(4, D, dtype=torch.float16)
    w13, w2 = _weights(torch.float16)
    s_ids, e_ids, npp = M.moe_align(ids, E, 16)
    with pytest.raises(ValueError, match="block_m=24"):
        M.moe_align(ids, E, 24)
    with pytest.raises(ValueError, match="K=200"):
        M.grouped_gemm(x[:, :128], w13, s_ids, e_ids, npp, 2)
    with pytest.raises(TypeError, match="a torch.float16 with w torch.bfloat16 is not a supported pair"):
        M.grouped_gemm(x, w13.bfloat16(), s_ids, e_ids, npp, 2)
    with pytest.raises(ValueError, match="pass moe_align's outputs unchanged"):
        M.grouped_gemm(x, w13, s_ids[:-1], e_ids, npp, 2)
    with pytest.raises(ValueError, match="a_scale is only for fp8 a"):
        M.grouped_gemm(x, w13, s_ids, e_ids, npp, 2, a_scale=torch.ones(4, 2))
    w13q, w13s = _quantize_experts(w13)
    xq, _ = R.act_quant(x)
    with pytest.raises(ValueError, match="fp8 w needs w_scale"):
        M.grouped_gemm(xq, w13q, s_ids, e_ids, npp, 2)
    with pytest.raises(ValueError, match="fp8 a needs a_scale"):
        M.grouped_gemm(xq, w13q, s_ids, e_ids, npp, 2, w_scale=w13s)
    with pytest.raises(TypeError, match="not a supported pair"):
        M.grouped_gemm(xq, w13, s_ids, e_ids, npp, 2)
    with pytest.raises(ValueError, match="topk_weights has 3 entries"):
        M.grouped_gemm(x, w13, s_ids, e_ids, npp, 2, topk_weights=torch.ones(3))
    with pytest.raises(ValueError, match="both w13_scale and w2_scale"):
        M.fused_moe(x, w13, w2, rw, ids, w13_scale=torch.ones(1))
    with pytest.raises(ValueError, match=r"must both be \[T=4, k\]"):
        M.fused_moe(x, w13, w2, rw[:, :1], ids)


def test_fused_moe_w2_of_other_experts_is_refused():
    """w2 with fewer experts than w13 (the alignment's E) was read past its end for the experts it lacks,
    and a w2 of another model dim gave [T, D'] rows: neither was checked."""
    ids, rw = _routing(4, 2)
    x = torch.randn(4, D, dtype=torch.float16)
    w13, w2 = _weights(torch.float16)
    with pytest.raises(ValueError, match="fused_moe: w2"):
        M.fused_moe(x, w13, w2[:1].contiguous(), rw, ids)
    with pytest.raises(ValueError, match="fused_moe: w2"):
        M.fused_moe(x, w13, w2[:, :-1].contiguous(), rw, ids)


class _MaxAlloc(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any torch op produces (elements), and which op made it."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


def test_memory_is_linear_in_assignments_not_in_weights_times_tokens(seed):
    """Every MoE function allocates O(E*N*K + (T*topk + E*block_m) * max(N, K)) elements.

    The first H200 run died in grouped_gemm_ref, which gathered w[topk_ids]: a [T*topk, N, K]
    tensor, 528 GiB at the 16b shapes with T=4096. Here T*topk*N*K is ~16x the bound.
    """
    torch.manual_seed(seed)
    t, k, block_m = 64, 6, 16
    ids, weights = _routing(t, k)
    x = torch.randn(t, D, dtype=torch.float16)
    w13, w2 = _weights(torch.float16)
    w13q, w13s = _quantize_experts(w13)
    w2q, w2s = _quantize_experts(w2)
    n_max = max(2 * I, D)
    bound = 2 * (E * 2 * I * D + (t * k + E * block_m) * n_max)
    assert t * k * 2 * I * D > 8 * bound, "shapes too small to tell linear from product memory"
    sorted_ids, expert_ids, npp = M.moe_align(ids, E, block_m)
    calls = {
        "moe_align": lambda: M.moe_align(ids, E, block_m),
        "grouped_gemm": lambda: M.grouped_gemm(x, w13, sorted_ids, expert_ids, npp, k, fuse_swiglu=True),
        "grouped_gemm_ref": lambda: M.grouped_gemm_ref(x, w13, ids, k, fuse_swiglu=True),
        "grouped_gemm_ref fp8": lambda: M.grouped_gemm_ref(*R.act_quant(x)[:1], w13q, ids, k,
                                                           a_scale=R.act_quant(x)[1], w_scale=w13s),
        "fused_moe": lambda: M.fused_moe(x, w13, w2, weights, ids, block_m=block_m),
        "fused_moe_ref fp8": lambda: M.fused_moe_ref(x, w13q, w2q, weights, ids, w13_scale=w13s, w2_scale=w2s),
    }
    for name, fn in calls.items():
        with _MaxAlloc() as probe:
            fn()
        assert probe.numel <= bound, f"{name}: {probe.op} made a {probe.numel}-element tensor (bound {bound})"


def _recorded_grids(monkeypatch, module, name: str) -> list[tuple[str, tuple]]:
    """(kernel name, grid) of every launch through module.<name>: the kernels' `launch(kernel, tuned,
    configs, grid, args, kwargs, config)` or the engines' `launch_spec(spec)` (engines/torch_launch.py)."""
    seen, real = [], getattr(module, name)

    def record(*call):
        spec = call[0] if len(call) == 1 else LaunchSpec(*call[:6])
        kernel = spec.kernel
        seen.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__,
                     tuple(spec.grid({**spec.kwargs, **spec.configs[0].kwargs}))))
        return real(*call)

    monkeypatch.setattr(module, name, record)
    return seen


def _recorded_aligns(monkeypatch) -> list:
    """The moe_align kernels launched (through kernels/moe_align.py traceable) from here on."""
    seen, real = [], M.moe_align.__globals__["traceable"]
    monkeypatch.setitem(M.moe_align.__globals__, "traceable", lambda kernel: seen.append(kernel) or real(kernel))
    return seen


def _fp8_experts(e: int = E):
    w13, w2 = (torch.randn(e, 2 * I, D) / D**0.5), (torch.randn(e, D, I) / I**0.5)
    return _quantize_experts(w13), _quantize_experts(w2)


@pytest.mark.parametrize("case", ["decode_distinct", "shared_expert", "one_expert_many_tokens"])
def test_grouped_gemm_grid_launches_only_blocks_that_can_hold_work(seed, monkeypatch, case):
    """Row blocks launched = min(n_blocks, T*k): 6 instead of 61 at T=1, k=6, E=64 (all k experts
    distinct, every launched block used); 6 of 8 when 3 tokens share experts 0 and 1 (2 used, the
    rest exit on num_tokens_post_pad); n_blocks = 10 < T*k = 40 when 40 tokens pick one expert.
    Outputs NaN-poisoned (conftest) and checked against the per-expert loop."""
    torch.manual_seed(seed)
    t, k, e = {"decode_distinct": (1, 6, 64), "shared_expert": (3, 2, E), "one_expert_many_tokens": (40, 1, E)}[case]
    if case == "decode_distinct":
        ids, rw = _routing(t, k, e)
    else:
        ids = torch.stack([torch.randperm(2)[:k] for _ in range(t)]) if k == 2 else torch.full((t, k), 3)
        rw = torch.rand(t, k)
    x = torch.randn(t, D, dtype=torch.float16)
    (w13q, w13s), (w2q, w2s) = _fp8_experts(e)
    block_m = 16
    s_ids, e_ids, npp = M.moe_align(ids, e, block_m)
    n_blocks = e_ids.numel()
    xq, xs = R.act_quant(x)
    grids = _recorded_grids(monkeypatch, M, "launch")
    h = M.grouped_gemm(xq, w13q, s_ids, e_ids, npp, k, a_scale=xs, w_scale=w13s, fuse_swiglu=True,
                       out_dtype=torch.float16)
    hq, hs = R.act_quant(h)
    y = M.grouped_gemm(hq, w2q, s_ids, e_ids, npp, 1, a_scale=hs, w_scale=w2s, topk_weights=rw,
                       out_dtype=torch.float32)
    want_rows = min(n_blocks, t * k)
    assert want_rows < n_blocks or case == "one_expert_many_tokens", "case does not exercise the bound"
    assert [g[0] for _, g in grids] == [want_rows, want_rows], (grids, n_blocks)
    assert want_rows * block_m >= npp.item(), "a used block was not launched"
    h_ref = M.grouped_gemm_ref(xq, w13q, ids, k, a_scale=xs, w_scale=w13s, fuse_swiglu=True, out_dtype=torch.float16)
    assert_finite("grouped_gemm up", h)
    assert mean_rel(h, h_ref) < TOL["fused_moe_fp8_fp16"]
    y_ref = M.grouped_gemm_ref(hq, w2q, ids.reshape(-1, 1), 1, a_scale=hs, w_scale=w2s, topk_weights=rw)
    assert_finite("grouped_gemm down", y)
    assert mean_rel(y, y_ref) < TOL["fp8_gemm_fp32_out"]


@pytest.mark.parametrize("t", [1, 2])
def test_engine_moe_fp8_decode_form_launches(seed, monkeypatch, t):
    """dsv3_aoti::moe_experts_fp8 (the CUDA lowering's launch code, run by the interpreter): moe_align
    (not at one token: the direct mode), act_quant, the up GEMM, act_quant of h, the down GEMM, each
    GEMM on min(n_blocks, T*k) row blocks; the same bits as fused_moe, the eager launcher, at the
    same block_m."""
    from dsv3_export.engines import torch_launch, torch_triton_moe
    from dsv3_export.engines import torch_triton as TT

    torch.manual_seed(seed)
    k = 3
    ids, rw = _routing(t, k)
    x = torch.randn(t, D, dtype=torch.bfloat16)
    x[-1, :QUANT_K] = 0
    (w13q, w13s), (w2q, w2s) = _fp8_experts()
    grids = _recorded_grids(monkeypatch, torch_launch, "launch_spec")
    aligns = _recorded_aligns(monkeypatch)
    args = (x, rw.bfloat16(), ids, w13q, w13s, w2q, w2s, TT.BLOCK_M["decode"])
    out = torch_triton_moe.moe_experts_fp8(*args)
    assert len(aligns) == (t > 1), aligns
    assert [name for name, _ in grids] == ["_act_quant_ieee_kernel", "_grouped_gemm_kernel"] * 2, grids
    n_blocks = -(-(t * k + E * 15) // 16)
    assert all(g[0] == min(n_blocks, t * k) == t * k for name, g in grids if name == "_grouped_gemm_kernel"), grids
    assert_finite("moe_experts_fp8", out)
    calls, real = [], M.act_quant_kernel
    monkeypatch.setattr(M, "act_quant_kernel", lambda a, *r, **kw: calls.append(a.shape) or real(a, *r, **kw))
    eager = M.fused_moe(x, w13q, w2q, rw.bfloat16(), ids, w13_scale=w13s, w2_scale=w2s, block_m=TT.BLOCK_M["decode"])
    assert len(calls) == 2, "fused_moe fp8 quantizes x and h with act_quant launches"
    assert torch.equal(out, eager)


@pytest.mark.parametrize("precision", ["fp8", "fp16"])
def test_one_token_direct_mode_skips_alignment_with_the_same_bits(seed, monkeypatch, precision):
    """At T=1 fused_moe launches no moe_align: its outputs stay unwritten (poisoned: int max) and the
    grouped GEMMs take each assignment's expert from topk_ids, one program row per assignment. Same
    bits as the aligned path (direct=False); E=64 with the 16b preset's k=8 (6 routed + 2 shared)."""
    torch.manual_seed(seed)
    e, k = 64, 8
    ids, rw = _routing(1, k, e)
    x = torch.randn(1, D, dtype=torch.float16)
    if precision == "fp8":
        (w13, w13s), (w2, w2s) = _fp8_experts(e)
        kw = dict(w13_scale=w13s, w2_scale=w2s)
    else:
        w13, w2 = (torch.randn(e, 2 * I, D) / D**0.5).half(), (torch.randn(e, D, I) / I**0.5).half()
        kw = {}
    aligned = M.fused_moe(x, w13, w2, rw.half(), ids, direct=False, **kw)
    kernels = _recorded_aligns(monkeypatch)
    grids = _recorded_grids(monkeypatch, M, "launch")
    direct = M.fused_moe(x, w13, w2, rw.half(), ids, **kw)
    assert kernels == [], "moe_align launched at one token"
    assert [g[0] for name, g in grids if name == "_grouped_gemm_kernel"] == [k, k], grids
    assert_finite("fused_moe direct", direct)
    assert torch.equal(direct, aligned)
    ref = M.fused_moe_ref(x, w13, w2, rw.half(), ids, **kw)
    assert mean_rel(direct, ref) < TOL["fused_moe_fp8_fp16" if precision == "fp8" else "fused_moe_fp16"]


def test_direct_ids_above_one_token_take_the_aligned_path(seed):
    """direct_ids passed at T=3 (T*k above k): the kernel reads the alignment, as without them."""
    torch.manual_seed(seed)
    t, k = 3, 2
    ids = torch.stack([torch.randperm(2)[:k] for _ in range(t)])  # tokens share experts 0 and 1
    x = torch.randn(t, D, dtype=torch.float16)
    w13, _ = _weights(torch.float16)
    s_ids, e_ids, npp = M.moe_align(ids, E, 16)
    out = M.grouped_gemm(x, w13, s_ids, e_ids, npp, k, fuse_swiglu=True, out_dtype=torch.float32,
                         direct_ids=ids.contiguous())
    plain = M.grouped_gemm(x, w13, s_ids, e_ids, npp, k, fuse_swiglu=True, out_dtype=torch.float32)
    assert torch.equal(out, plain)
    assert mean_rel(out, M.grouped_gemm_ref(x, w13, ids, k, fuse_swiglu=True)) < TOL["grouped_gemm_fp16"]
    with pytest.raises(ValueError, match="direct_ids .* must be the contiguous topk_ids of the 6 assignments"):
        M.grouped_gemm(x, w13, s_ids, e_ids, npp, k, direct_ids=ids[:2])


def test_fused_moe_of_no_tokens_is_empty():
    """Zero tokens routed: the final view(T, k, -1) of an empty tensor raised torch's 'cannot reshape' error."""
    w13, w2 = _weights(torch.float16)
    ids, rw = torch.zeros((0, 2), dtype=torch.int64), torch.zeros((0, 2))
    y = M.fused_moe(torch.randn(0, D, dtype=torch.float16), w13, w2, rw, ids)
    assert y.shape == (0, D) and y.dtype == torch.float16
