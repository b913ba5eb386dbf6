"""engines/torch_attn_norm.py: each attention norm of a decode program computed by the wq + wkv_a GEMV
(DSV3_TORCH_ATTN_NORM=gemv).

In the Triton CPU interpreter (a subprocess: TRITON_INTERPRET must be set before the kernels are decorated): the tiny
fp8 model with 8 heads (wq 384 rows, so fuse_shared_input_linears makes wq + wkv_a one Linear, as at the 16b shapes),
routed and lowered for CUDA as engines/torch.py lower_program does, with the rewrite and without, on random inputs at
batch 2 (the GEMV computes the norm) and 3 (our norm kernel, act_quant, the tile GEMM): one rewrite per layer after
the first, its rms_norm gone, and the logits and kv rows the unrewritten program's within the rounding bound below.
"""

from __future__ import annotations

from tests.engines._program_script import SCRIPT_PREAMBLE, run_script

_SCRIPT = SCRIPT_PREAMBLE + r'''
import torch
from dsv3_export.engines.torch_attn_norm import ATTN_NORM_ENV, attn_norm_into_gemv
from dsv3_export.engines.torch_lower import lower_dsv3_ops
from dsv3_export.engines.torch_router import fuse_router
from dsv3_export.engines.torch_triton import triton_lowerings
from dsv3_export.export import export_step
from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.graph_utils import count_calls
from dsv3_export.passes.pipeline import run_pipeline
from dsv3_export.reference import ModelArgs, Transformer
from tests.passes.tiny_programs import step_inputs

out = {}
torch.manual_seed(0)
model = Transformer(ModelArgs.preset("tiny").replace(n_layers=3, n_heads=8, dtype="fp8"), dtype=torch.bfloat16).eval()
for layer in model.layers:  # norms that are not all ones: a dropped weight shows
    for norm in (layer.attn_norm, layer.ffn_norm):
        norm.weight.data = (1 + 0.3 * torch.randn(norm.weight.shape)).to(norm.weight.dtype)
program, reports = run_pipeline(export_step(model, "decode"), PassConfig(precision="fp8"))
out["fused_linears"] = next(r.matches for r in reports if r.name == "fuse_shared_input_linears")
routed, _ = fuse_router(program, "decode")
os.environ.pop(ATTN_NORM_ENV, None)
out["default"] = attn_norm_into_gemv(routed, "decode", True)[1]
out["prefill"] = attn_norm_into_gemv(routed, "prefill", True)[1]
os.environ[ATTN_NORM_ENV] = "gemv"
out["no_gemv"] = attn_norm_into_gemv(routed, "decode", False)[1]
rewritten, out["how"] = attn_norm_into_gemv(routed, "decode", True)
out["rms_norm"] = [count_calls(p.graph, [torch.ops.aten.rms_norm.default]) for p in (routed, rewritten)]
out["ops"] = count_calls(rewritten.graph, [torch.ops.dsv3_aoti.norm_fp8_linear.default])
want_p, _ = lower_dsv3_ops(routed, "cuda", triton_lowerings("decode", gemv=True))
got_p, _ = lower_dsv3_ops(rewritten, "cuda", triton_lowerings("decode", gemv=True))
for batch in (2, 3):  # the GEMV path, the norm kernel + tile GEMM path
    tokens, start_pos, kv_cache = step_inputs("decode", seed + batch, torch.bfloat16, batch=batch)
    inputs = (tokens, start_pos, kv_cache[:, :3].contiguous())
    with torch.no_grad():
        want, got = want_p.module()(*inputs), got_p.module()(*inputs)
    out[f"b{batch}_logits_rel"] = float((got[0].double() - want[0].double()).norm() / want[0].double().norm())
    out[f"b{batch}_kv_equal_layer0"] = torch.equal(got[1][:, :1], want[1][:, :1])  # before the first rewritten norm
    out[f"b{batch}_kv_rel"] = float((got[1].double() - want[1].double()).norm() / want[1].double().norm())
    out[f"b{batch}_finite"] = bool(torch.isfinite(got[0]).all())
print(json.dumps(out))
'''


def test_rewritten_decode_program_in_the_interpreter(seed):
    out = run_script(_SCRIPT, "interpret", seed)
    assert out["fused_linears"] >= 3, out  # wq + wkv_a in every layer: the Linear the GEMV takes
    assert out["default"] == "Inductor (DSV3_TORCH_ATTN_NORM=0)" and out["prefill"] == "Inductor (prefill)", out
    assert out["no_gemv"] == "Inductor: this decode program has no GEMV (DSV3_TORCH_ATTN_NORM=gemv)", out
    assert out["how"].startswith("2 of ") and out["how"].endswith(
        "fp8 Linears with their attention norm in the GEMV (DSV3_TORCH_ATTN_NORM=gemv)"), out["how"]
    assert out["ops"] == 2 and out["rms_norm"][0] - out["rms_norm"][1] == 2, out  # layers 1 and 2 (0: the embedding)
    for b in (2, 3):
        assert out[f"b{b}_finite"] and out[f"b{b}_kv_equal_layer0"], out
        # the same bits on every seed tried; a last-bit difference of x (its fp32 mean square summed in another
        # order) could round an fp8 value of act_quant(x) the other way: a small bound, where a dropped norm weight
        # gives ~0.2-0.3
        assert out[f"b{b}_logits_rel"] < 5e-3 and out[f"b{b}_kv_rel"] < 5e-3, out
