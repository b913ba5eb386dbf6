"""The reference Transformer: single device, pure torch, DeepSeek's module and parameter names.

    model = Transformer(ModelArgs.preset("tiny"))     # seeded random weights (torch.manual_seed)
    logits = model(tokens, start_pos=0)              # [b, s] int64 -> [b, s, vocab] float32

The KV cache lives in buffers (DeepSeek's design): a call with start_pos=p writes positions
[p, p + s) of rows [0, b) and attends over [0, p + s). Prefill then one-token decode steps
therefore give the same logits as one full-sequence call.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from dsv3_export.reference.args import ModelArgs
from dsv3_export.reference.attention import MLA
from dsv3_export.reference.fp8 import weight_quant
from dsv3_export.reference.layers import Linear, RMSNorm, rope_tables
from dsv3_export.reference.moe import MLP, MOE_IMPLS, Gate, MoE


class Block(nn.Module):
    """Pre-norm residual block: x + attn(attn_norm(x)), then + ffn(ffn_norm(x))."""

    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype, moe_impl: str):
        super().__init__()
        self.attn = MLA(args, dtype)
        if args.is_moe_layer(layer_id):
            self.ffn: nn.Module = MoE(args, dtype, moe_impl)
        else:
            self.ffn = MLP(args.dim, args.inter_dim, fp8=args.dtype == "fp8", dtype=dtype, block_size=args.block_size)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype)

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), start_pos, cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.float32, moe_impl: str = "loop"):
        """dtype: compute dtype and dtype of every dense weight and of the KV cache.

        moe_impl: "loop" (DeepSeek's eager loop) or "static" (exportable); see set_moe_impl.
        Weights are drawn from the global torch RNG unless built on the meta device.
        """
        super().__init__()
        self.args = args
        self.dtype = dtype
        self.embed = nn.Embedding(args.vocab_size, args.dim, dtype=dtype)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(i, args, dtype, moe_impl) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.head = Linear(args.dim, args.vocab_size, dtype=dtype)
        cos, sin = rope_tables(args)
        device = self.embed.weight.device
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        if device.type != "meta":
            init_random_weights(self)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        end_pos = start_pos + seqlen
        torch._check(bsz <= self.args.max_batch_size,
                     lambda: f"batch {bsz} exceeds max_batch_size={self.args.max_batch_size}")
        torch._check(end_pos <= self.args.max_seq_len,
                     lambda: f"positions up to {end_pos} exceed max_seq_len={self.args.max_seq_len}")
        h = self.embed(tokens)  # [b, s, dim]
        cos = self.rope_cos[start_pos:end_pos]  # [s, r/2]
        sin = self.rope_sin[start_pos:end_pos]
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin)
        return self.head(self.norm(h)).float()  # [b, s, vocab]

    # --- utilities -----------------------------------------------------------------------------
    def set_moe_impl(self, moe_impl: str) -> "Transformer":
        """Switch every MoE layer between the eager loop and the exportable static form."""
        if moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={moe_impl!r} is not one of {MOE_IMPLS}")
        for module in self.modules():
            if isinstance(module, MoE):
                module.moe_impl = moe_impl
        return self

    def reset_cache(self) -> None:
        for name, buf in self.named_buffers():
            if name.endswith("_cache"):
                buf.zero_()

    def materialize_buffers(self, device: torch.device | str) -> None:
        """Recreate the non-persistent buffers (rope tables, zeroed caches) on `device`.

        Needed after building on the meta device and assigning real weights.
        """
        cos, sin = rope_tables(self.args)
        self.rope_cos = cos.to(device)
        self.rope_sin = sin.to(device)
        for module in self.modules():
            if isinstance(module, MLA):
                for name in ("k_cache", "v_cache", "kv_cache", "pe_cache"):
                    if hasattr(module, name):
                        buf = getattr(module, name)
                        setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype, device=device))


@torch.no_grad()
def init_random_weights(model: Transformer) -> None:
    """Seeded random weights at realistic scales: projections N(0, 1/fan_in), embedding N(0, 1),
    norms 1, a small routing bias. fp8 Linears are drawn dense and quantized blockwise.

    One draw from the global torch RNG seeds a generator per tensor, so the weights depend only on
    that RNG's state (and the device type), not on the order or thread the tensors are drawn in.
    On the CPU the draws run on a thread pool (torch releases the GIL): a single-threaded randn
    makes ~0.2 G values/s, ~75 s for the 16b preset's 15.7 B weights before this.
    """
    base_seed = int(torch.randint(0, 2**62, (1,)).item())
    modules = [m for m in model.modules() if isinstance(m, (Linear, Gate, RMSNorm))] + [model.embed]
    device = model.embed.weight.device
    workers = max(1, torch.get_num_threads()) if device.type == "cpu" else 1
    if workers == 1:
        for index, module in enumerate(modules):
            _draw(module, base_seed + index)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:  # largest first: shorter tail
        order = sorted(range(len(modules)), key=lambda i: -sum(p.numel() for p in modules[i].parameters()))
        for future in [pool.submit(_draw, modules[i], base_seed + i) for i in order]:
            future.result()


@torch.no_grad()
def _draw(module: nn.Module, seed: int) -> None:
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    if isinstance(module, Linear):
        dense = torch.randn(module.out_features, module.in_features, device=device, generator=gen)
        dense *= max(module.in_features, 1) ** -0.5  # in_features 0: the empty shared experts of n_shared_experts=0
        if module.is_fp8:
            q, s = weight_quant(dense, module.block_size)
            module.weight.copy_(q)
            module.scale.copy_(s)
        else:
            module.weight.copy_(dense)
    elif isinstance(module, Gate):
        module.weight.normal_(0.0, module.weight.shape[1] ** -0.5, generator=gen)
        if module.bias is not None:
            module.bias.normal_(0.0, 0.02, generator=gen)
    elif isinstance(module, RMSNorm):
        module.weight.fill_(1.0)
    else:  # the embedding table
        module.weight.normal_(0.0, 1.0, generator=gen)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
