"""Checkpoint loading and saving: DeepSeek and HuggingFace layouts, bf16/fp32 or fp8 + scales.

    model = load_checkpoint(path, dtype=torch.float32, device="cpu")   # -> reference.Transformer
    save_checkpoint(model, path, layout="deepseek" | "hf")
    model = preset_model("tiny", torch.float32, "cpu", seed=0)        # seeded random weights

Layouts. DeepSeek: config.json holds ModelArgs keys (ModelArgs.from_dict, strict) and the
safetensors files our (DeepSeek's) tensor names, e.g. convert.py's model0-mp1.safetensors; mp > 1
is refused. HF: config.json with model_type deepseek_v2 / deepseek_v3, HF tensor names (single
file or sharded with model.safetensors.index.json), experts per-expert or fused 3-D, fp8 weights
with weight_scale_inv. Only safetensors are read, memory-mapped; pickle files are never opened.

HF semantics (transformers 5.24, verified by tests/test_hf_compat.py; details in docs/hf_compat.md):
  * Keys a config.json leaves out take transformers' config-class defaults; keys we do not know
    are refused; the published DeepSeek-V2-Lite / V3 configs give exactly our 16b / 671b presets.
  * RoPE: DeepseekV2 rotates interleaved pairs through a complex view, exactly as DeepSeek does;
    DeepseekV3 does too when rope_interleave=true (the default; its outputs come out
    de-interleaved, which dot products do not see). With rope_interleave=false V3 uses rotate_half,
    and the loader reorders the rope rows of wq / wq_b (per head) and wkv_a to DeepSeek's pairs.
  * Softmax scale: HF uses rope_scaling.mscale_all_dim -> ModelArgs.mscale. HF also scales cos/sin
    by get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim); only 1 is accepted.
  * YaRN: HF applies it whenever rope_type is yarn; our model only when max_seq_len >
    original_seq_len, so HF YaRN configs need max_seq_len > original_max_position_embeddings.
  * Routing: V2 softmax, greedy / group_limited_greedy, never normalized (HF 5.24 ignores
    norm_topk_prob for V2); V3 sigmoid + e_score_correction_bias, top-2-sum group scores,
    normalized with +1e-20 in the denominator (ours: none), norm_topk_prob=false refused.
Every load error is a CheckpointError (a ValueError) naming the file, key or tensor; an unknown
ModelArgs key in a DeepSeek-layout config is the reference's ConfigError.
"""

from dsv3_export.checkpoint.errors import CheckpointError
from dsv3_export.checkpoint.load import load_args, load_checkpoint
from dsv3_export.checkpoint.presets import preset_model
from dsv3_export.checkpoint.save import LAYOUTS, save_checkpoint

__all__ = ["LAYOUTS", "CheckpointError", "load_args", "load_checkpoint", "preset_model", "save_checkpoint"]
