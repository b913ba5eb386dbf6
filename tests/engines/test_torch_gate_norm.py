"""engines/torch_gate_norm.py: each MoE layer's ffn norm computed by the router's gate kernel (DSV3_TORCH_GATE_NORM=1).

In the Triton CPU interpreter (a subprocess: TRITON_INTERPRET must be set before the kernels are decorated): the tiny
fp8 model's decode program, routed as engines/torch.py lower_program routes it (fuse_router's split gate writing the
MoE's act_quant(x)) and lowered for CUDA, with the rewrite and without, on random inputs: one rewrite per MoE layer,
its rms_norm gone, the kv rows computed before the first MoE's output the same bits, and the logits and the last
layer's kv row the unrewritten program's (bit for bit on the seeds tried).
"""

from __future__ import annotations

from tests.engines._program_script import SCRIPT_PREAMBLE, run_script

_SCRIPT = SCRIPT_PREAMBLE + r'''
import torch
from dsv3_export.engines.torch_gate_norm import GATE_NORM_ENV, gate_norm_into_router
from dsv3_export.engines.torch_lower import lower_dsv3_ops
from dsv3_export.engines.torch_router import fuse_router
from dsv3_export.engines.torch_triton import triton_lowerings
from dsv3_export.export import export_step
from dsv3_export.passes.base import PassConfig
from dsv3_export.passes.pipeline import run_pipeline
from dsv3_export.reference import ModelArgs, Transformer
from tests.passes.tiny_programs import step_inputs

out = {}
torch.manual_seed(0)
model = Transformer(ModelArgs.preset("tiny").replace(n_layers=3, dtype="fp8"), dtype=torch.bfloat16).eval()
for layer in model.layers:  # norms that are not all ones: a dropped weight shows
    for norm in (layer.attn_norm, layer.ffn_norm):
        norm.weight.data = (1 + 0.3 * torch.randn(norm.weight.shape)).to(norm.weight.dtype)
program, _ = run_pipeline(export_step(model, "decode"), PassConfig(precision="fp8"))
routed, _ = fuse_router(program, "decode")
os.environ.pop(GATE_NORM_ENV, None)
out["default"] = gate_norm_into_router(routed, "decode")[1]
out["prefill"] = gate_norm_into_router(routed, "prefill")[1]
os.environ[GATE_NORM_ENV] = "1"
rewritten, out["how"] = gate_norm_into_router(routed, "decode")
from dsv3_export.passes.graph_utils import count_calls
out["rms_norm"] = [count_calls(p.graph, [torch.ops.aten.rms_norm.default]) for p in (routed, rewritten)]
out["ops"] = count_calls(rewritten.graph, [torch.ops.dsv3_aoti.router_gate_norm_topk_quant.default])
tokens, start_pos, kv_cache = step_inputs("decode", seed, torch.bfloat16)
inputs = (tokens, start_pos, kv_cache[:, :3].contiguous())
want_p, _ = lower_dsv3_ops(routed, "cuda", triton_lowerings("decode"))
got_p, _ = lower_dsv3_ops(rewritten, "cuda", triton_lowerings("decode"))
with torch.no_grad():
    want, got = want_p.module()(*inputs), got_p.module()(*inputs)
out["logits_rel"] = float((got[0].double() - want[0].double()).norm() / want[0].double().norm())
out["kv_equal"] = torch.equal(got[1][:, :2], want[1][:, :2])  # layers 0-1's rows: before the first MoE's output
out["kv_rel"] = float((got[1].double() - want[1].double()).norm() / want[1].double().norm())
out["finite"] = bool(torch.isfinite(got[0]).all())
print(json.dumps(out))
'''


def test_rewritten_decode_program_in_the_interpreter(seed):
    out = run_script(_SCRIPT, "interpret", seed)
    assert out["default"] == "Inductor (DSV3_TORCH_GATE_NORM=0)" and out["prefill"] == "Inductor (prefill)", out
    assert out["how"] == "2 of 2 ffn norms into the router's gate kernel (DSV3_TORCH_GATE_NORM=1)", out["how"]
    assert out["ops"] == 2 and out["rms_norm"][0] - out["rms_norm"][1] == 2, out
    assert out["finite"] and out["kv_equal"], out
    # the same bits on every seed tried (the kernel rounds h and x to nearest even, as torch does); a last-bit
    # difference of x (its fp32 mean square is summed in another order) could round an fp8 value of act_quant(x) the
    # other way: a small bound, where a dropped norm weight gives ~0.3 and the interpreter's truncating bf16 cast
    # (before the kernel rounded itself) gave 0.03
    assert out["logits_rel"] < 5e-3 and out["kv_rel"] < 5e-3, out
