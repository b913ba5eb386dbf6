"""The bandwidth floor of a decode step, shared by the 16b benchmark scripts: the bytes it must read."""

from __future__ import annotations

from dsv3_export.stats import model_stats


def decode_step_bytes(model, batch: int, context: int) -> float:
    """Bytes one decode step of `batch` rows at `context` cached positions must read at least:
    each weight once at the precision the checkpoint stores it (fp8 Linears with their fp32 scales;
    head, gate and norms in bf16, as DeepSeek's fp8 checkpoints keep them), the embedding only for
    its `batch` rows, the routed experts a batch is expected to touch under uniform routing, and
    the latent cache once. `model` may live on the meta device."""
    a = model.args
    e, k = a.n_routed_experts, a.n_activated_experts
    touched = 1.0 - (1.0 - k / e) ** batch  # expected fraction of a layer's experts the batch uses
    weights = 0.0
    for name, p in model.named_parameters():
        if name.startswith("embed."):
            continue
        weights += p.numel() * p.element_size() * (touched if ".experts." in name else 1.0)
    embedding_rows = batch * a.dim * model.embed.weight.element_size()
    cache = batch * context * model_stats(a).kv_values_per_token_absorbed * 2  # bf16 latent + rope key
    return weights + embedding_rows + cache
