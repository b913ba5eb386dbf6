"""How many batch rows one ONNX Runtime CUDA run may take: every tensor under 2^31 elements.

    per_row = step_row_elements(args, seq, cache_len)   # largest tensor of a step, per batch row
    rows = rows_per_run(args, seq, cache_len, CUDA_MAX_ELEMENTS)   # OrtStep splits the batch by it

Why: ONNX Runtime's CUDA kernels index tensors with 32-bit ints (CUDA_LONG), so a tensor of 2^31
or more elements is read and written out of bounds: "CUDA failure 700: an illegal memory access"
(microsoft/onnxruntime#28385 for Cast, #32299 for Softmax; the same pattern in other elementwise
kernels). A step materializes large tensors: the attention scores over [cache | new] are
[b, h, s, T + s] in fp32 and the logits [b, s, V]. `dsv3-export profile --batch 64 --prompt-len
1024` of the 16b engine made 2.18e9-element scores and 6.7e9-element logits in its prefill and
crashed. Batch rows are independent (own tokens, start position and cache rows), so a step over
b rows is the same as steps over row chunks; a single row too large for one run is refused.

The bound is the largest of the tensors the graph materializes per row, written out below;
tests/engines/test_ort_cuda_limits.py checks it against every value of a built graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsv3_export.reference.args import ModelArgs

# 2^30, not 2^31 - 1: headroom of 2x for any intermediate the bound below does not list and for
# kernels that compute an index a little past the end (grid-stride loops). A run of 2^30 elements
# is far larger than a kernel launch's overhead, so the extra split costs nothing measurable.
CUDA_MAX_ELEMENTS = 2**30


def step_row_elements(args: "ModelArgs", seq: int, cache_len: int) -> int:
    """Elements per batch row of the largest tensor one step of `seq` new tokens over a cache of
    `cache_len` positions reads, writes or materializes (any dtype)."""
    a = args
    width = a.latent_cache_width
    head_dims = max(width, a.qk_head_dim, a.v_head_dim)
    ffn = max(a.dim, a.inter_dim, a.q_lora_rank, a.n_routed_experts, a.n_shared_experts * a.moe_inter_dim,
              a.n_activated_experts * 2 * a.moe_inter_dim)  # MoE: k gate|up rows of 2I per token
    return max(
        a.n_layers * cache_len * width,  # kv_cache input [L, T, c + r] (and its per-layer split)
        a.n_layers * seq * width,  # new_kv output [L, s, c + r]
        a.n_heads * seq * (cache_len + seq),  # attention scores over [cache | new] [h, s, T + s]
        a.n_heads * seq * head_dims,  # q, absorbed q, latent attention output [h, s, .]
        seq * a.vocab_size,  # logits [s, V]
        seq * ffn,  # hidden states, MLP / MoE intermediates [s, .]
    )


def rows_per_run(args: "ModelArgs", seq: int, cache_len: int, max_elements: int) -> int:
    """Most batch rows one run may take so that no tensor reaches `max_elements`; ValueError when
    a single row already does (a shorter prefill, in several steps, is then the way)."""
    per_row = step_row_elements(args, seq, cache_len)
    if per_row > max_elements:
        raise ValueError(
            f"one batch row of a step with seq={seq} over a cache of {cache_len} positions needs a tensor of "
            f"{per_row:,} elements, more than this engine's per-run limit of {max_elements:,} (ONNX Runtime's "
            f"CUDA kernels index with 32-bit ints); prefill the prompt in shorter pieces")
    return max_elements // per_row
