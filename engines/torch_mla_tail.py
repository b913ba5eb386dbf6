"""MLA decode's tail fused with wo's act_quant, in the torch backend's CUDA decode program (fp8 engines).

Why: the fp8 decode step ran, per layer after the split-KV kernel, the merge of the splits, head_gemm
with W_UV and act_quant of wo's input: three launches of ~2-3 us each at batch 1 (H200 profile),
launch latency more than work. Two ways to hand wo its input already quantized (DSV3_TORCH_MLA_TAIL at
build time; off by default):

  1      kernels/mla_tail.py does the three in one kernel. Measured slower on the H200 (session 8, CUDA
         graphs, 16b shapes, context 1024): split + tail 23.7 / 25.8 / 72.4 us at batch 1 / 8 / 64
         against 21.2 / 23.8 / 57.3 for split + reduce + head_gemm + act_quant; in the 27-layer batch-1
         step 269 us against ~235 (W_UV streamed by 16 programs at batch 1, re-read per row at 64).
         q, s are act_quant of the kernel's bf16 output, which may differ from the separate kernels'
         by one bf16 step now and then (other summation orders; kernels/mla_tail.py). The same switch
         makes the decode attentions this rewrite leaves (bf16 engines, v_head_dim != 128) run the
         unquantized tail, merge + W_UV in one kernel (engines/torch_triton.py mla_attention(tail=True)).
  gemmq  the split and reduce kernels as before, then W_UV by kernels/mla_absorb.py head_gemm_quant,
         which quantizes its own output (act_quant in the epilogue): one launch fewer per layer, and
         bit-identical to head_gemm + act_quant (the same K loop, the same quantize_rows), so the
         engine's numbers do not move (with DSV3_TORCH_ABSORB_GEMM=0 W_UK is the einsum as in
         mla_attention, W_UV still head_gemm_quant). Attentions it leaves run mla_attention's default.

Rewrites (after export, before the dsv3:: ops are lowered; the decode program only):

    o = dsv3::mla_attention(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, scale)  # [b, 1, h, 128]
    x = flatten(o, 2)                                                                 # [b, 1, h * 128]
    dsv3::fp8_linear(x, W, S, act_quant=True)
becomes
    q, s = dsv3_aoti::mla_attention_q(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, scale, absorb, tail)
    dsv3_aoti::fp8_linear_q(q, s, W, S, dtype, decode=True)                          # q [b, 1, h * 128]

(tail: True for `1`, False for `gemmq`.) Only where each head's output is one 1x128 act_quant block
(v_head_dim == 128), the attention runs in bf16/fp16 (the fp32 engine keeps ATen) and fp8 GEMMs with
act_quant are the only readers of its output.
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram
from torch.fx import Node
from torch.library import triton_op

import dsv3_export.ops  # noqa: F401  (registers the dsv3:: ops matched here)
from dsv3_export.engines import torch_norm_quant  # noqa: F401  (registers dsv3_aoti::fp8_linear_q)
from dsv3_export.engines import torch_triton as tt
from dsv3_export.engines.torch_step import env_choice
from dsv3_export.kernels import fp8_quant as kq
from dsv3_export.kernels import mla_absorb as ka
from dsv3_export.kernels import mla_decode as kd
from dsv3_export.kernels import mla_tail as kt
from dsv3_export.kernels._common import QUANT_BLOCK
from dsv3_export.passes.graph_utils import is_call
from dsv3_export.passes.program_state import ProgramState

MLA_TAIL_ENV = "DSV3_TORCH_MLA_TAIL"
# 1: measured slower (module docstring). gemmq, measured on the H200 (session 9, CUDA graphs): head_gemm_quant
# 9.8 / 9.1 / 9.0 us at batch 1 / 8 / 64 against 9.0 / 9.1 / 10.9 for head_gemm + act_quant; 4-layer 16b fp8
# decode (unprofiled, graph) 0.55 / 0.77 ms at batch 1 / 8 against the defaults' 0.56 / 0.77: within noise.
MLA_TAIL_DEFAULT = "0"
MLA_TAIL_CHOICES = {"1": "merge + W_UV + wo's act_quant in one kernel (fp8 decode program)",
                    "gemmq": "reduce kernel, then W_UV + wo's act_quant in one head_gemm_quant (fp8 decode program)",
                    "0": "reduce, head_gemm and act_quant kernels"}
aten = torch.ops.aten
FLATTENS = (aten.flatten.using_ints, aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def decode_tail(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor,
                start_pos: torch.Tensor, wkv_b: torch.Tensor, softmax_scale: float, absorb_gemm: bool, quant: bool):
    """dsv3::mla_attention's decode (one new position) through kernels/mla_tail.py: W_UK as
    dsv3_aoti::mla_attention applies it (head_gemm, or the einsum with absorb_gemm False), the split
    kernel under the runtime split rule, then the tail -> (q fp8 [b, h * dv], s fp32 [b, h]) with quant
    (dv == 128), else [b, h, dv] in the attention's dtype."""
    b, s, h, dn = q_nope.shape
    c = wkv_b.shape[-1]
    torch._check(s == 1, lambda: f"dsv3_aoti::mla_attention (tail): decode needs one new position, got {s}")
    w = wkv_b.view(h, -1, c)  # [h, dn + dv, c]
    w_uk, w_uv = w[:, :dn], w[:, dn:]  # [h, dn, c], [h, dv, c]
    dev = q_nope.device
    seen = start_pos.clamp(0, kv_cache.shape[1]).to(torch.int32)  # [b] cached keys per row
    q_latent = tt.decode_query(q_nope, w_uk, absorb_gemm)  # [b, h, c]
    q_pe = q_pe.contiguous()
    split_target = kt.runtime_split_target(dev)
    o_part, lse = kd.split_partials(b, h, kd.MAX_SPLITS, c, dev)  # [b, h, S, c], [b, h, S]
    tt._launch(kt.decode_partials_spec(q_latent, q_pe[:, 0], kv_cache[:, :, :c], kv_cache[:, :, c:],
                                       kv_new[:, 0, :c], kv_new[:, 0, c:], seen, o_part, lse, softmax_scale,
                                       split_target))
    out, scale = kt.tail_outputs(b, h, w_uv.shape[1], q_nope.dtype, quant, dev)  # q, s or [b, h, dv]
    tt._launch(kt.mla_tail_spec(o_part, lse, seen, w_uv, out, scale, split_target, q_nope.is_cuda, kt.DECODE_MAX_B))
    return (out, scale) if quant else out


def decode_gemm_quant(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor,
                      start_pos: torch.Tensor, wkv_b: torch.Tensor, softmax_scale: float, absorb_gemm: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """dsv3_aoti::mla_attention's decode path itself (engines/torch_triton.py decode_latent: decode_query,
    mla_decode with the runtime split rule and its reduce), then W_UV and wo's act_quant by head_gemm_quant
    -> (q fp8 [b, h * 128], s fp32 [b, h]): the same bits as head_gemm + act_quant (dv == 128, bf16/fp16; checked by _match)."""
    lat, w_uv = tt.decode_latent(q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale, absorb_gemm,
                                 "dsv3_aoti::mla_attention_q (gemmq)")  # [b, h, c], [h, dv, c]
    b, h = lat.shape[:2]
    q, scale = kq.act_quant_outputs(b, h * w_uv.shape[1], q_nope.device)  # [b, h * dv], [b, h]: a block per head
    tt._launch(ka.head_gemm_quant_spec(lat, w_uv.transpose(1, 2), q, scale, ka.DECODE_MAX_M, lat.is_cuda))
    return q, scale


@triton_op("dsv3_aoti::mla_attention_q", mutates_args={})
def mla_attention_q(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor,
                    start_pos: torch.Tensor, wkv_b: torch.Tensor, softmax_scale: float, absorb_gemm: bool,
                    tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """dsv3::mla_attention's decode flattened and act_quant-ed for wo: q fp8 [b, 1, h * dv], s fp32
    [b, 1, h] (dv == 128), by decode_tail (tail, DSV3_TORCH_MLA_TAIL=1) or decode_gemm_quant (gemmq)."""
    args = (q_nope, q_pe, kv_new, kv_cache, start_pos, wkv_b, softmax_scale, absorb_gemm)
    q, scale = decode_tail(*args, True) if tail else decode_gemm_quant(*args)
    b, h = scale.shape
    return q.view(b, 1, q.shape[1]), scale.view(b, 1, h)


def _match(attn: Node, kind: str) -> dict | str:
    """The pieces of one attention -> flatten -> fp8 wo site, or why it is not one."""
    if kind != "decode":
        return f"{attn.name}: {kind} program (the tail kernel is decode's)"
    q_nope, wkv_b = attn.args[0].meta["val"], attn.args[5].meta["val"]
    out = attn.meta["val"]  # [b, s, h, dv]
    if out.dtype not in ka.DOT_DTYPES:
        return f"{attn.name}: {out.dtype} attention (the kernel's dots take bf16/fp16)"
    if wkv_b.dtype != out.dtype:
        return f"{attn.name}: wkv_b is {wkv_b.dtype}, the attention {out.dtype}"
    if not isinstance(out.shape[1], int) or out.shape[1] != 1:
        return f"{attn.name}: {out.shape[1]} new positions (decode has 1)"
    if out.shape[-1] != QUANT_BLOCK:
        return f"{attn.name}: v_head_dim {out.shape[-1]} (one {QUANT_BLOCK}-wide act_quant block per head needs 128)"
    if len(attn.users) != 1:
        return f"{attn.name}: {len(attn.users)} readers of the attention output"
    flat = next(iter(attn.users))
    if not is_call(flat, *FLATTENS) or tuple(flat.meta["val"].shape[2:]) != (q_nope.shape[2] * QUANT_BLOCK,) \
            or flat.meta["val"].dim() != 3:
        return f"{attn.name}: read by {flat.name}, not a flatten to [b, 1, h * 128]"
    linears = [u for u in flat.users if is_call(u, torch.ops.dsv3.fp8_linear.default) and u.args[0] is flat
               and u.args[3] is True]
    if not linears or len(linears) != len(flat.users):
        return f"{attn.name}: its flattened output is read by other than fp8 GEMMs with act_quant"
    return dict(attn=attn, flat=flat, linears=linears, dtype=out.dtype)


def _rewrite(state: ProgramState, site: dict, absorb: bool, tail: bool) -> None:
    ops = torch.ops.dsv3_aoti
    attn = site["attn"]
    with state.graph.inserting_before(attn):
        out = state.call(ops.mla_attention_q.default, (*attn.args[:7], absorb, tail), meta_from=attn)
        q, s = (state.call(operator.getitem, (out, i)) for i in range(2))
    for linear in site["linears"]:
        with state.graph.inserting_before(linear):
            new = state.call(ops.fp8_linear_q.default, (q, s, *linear.args[1:3], site["dtype"], True), meta_from=linear)
        linear.replace_all_uses_with(new)


def fuse_mla_tail(ep: ExportedProgram, kind: str) -> tuple[ExportedProgram, str]:
    """The program with each decode attention feeding fp8 wo rewritten (module docstring), and a line
    for the manifest's `lowerings` saying how many and why any was not."""
    value = env_choice(MLA_TAIL_ENV, MLA_TAIL_DEFAULT, MLA_TAIL_CHOICES)
    attns = [n for n in ep.graph.nodes if is_call(n, torch.ops.dsv3.mla_attention.default)]
    if value == "0" or not attns:
        return ep, f"not fused ({MLA_TAIL_ENV}=0)" if attns else "no MLA attention"
    state = ProgramState(ep)
    sites, skipped = [], []
    for node in state.graph.nodes:
        if is_call(node, torch.ops.dsv3.mla_attention.default):
            found = _match(node, kind)
            (skipped if isinstance(found, str) else sites).append(found)
    absorb, tail = tt._absorb_gemm(), value == "1"
    with torch.no_grad():
        for site in sites:
            _rewrite(state, site, absorb, tail)
    state.eliminate_dead_code()
    kernels = ("split kernel + kernels/mla_tail.py: merge, W_UV, act_quant in one launch" if tail else
               "split and reduce kernels + kernels/mla_absorb.py head_gemm_quant: W_UV, act_quant in one launch")
    how = (f"{len(sites)} of {len(attns)} MLA attentions + the act_quant of their fp8 wo -> dsv3_aoti::mla_attention_q "
           f"({kernels}) feeding fp8_linear_q")
    if skipped:
        how += f"; not fused: {skipped[0]}" + (f" (+{len(skipped) - 1} more)" if len(skipped) > 1 else "")
    return (state.program() if sites else ep), how
