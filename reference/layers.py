"""Building blocks: Linear (dense or fp8 blockwise), RMSNorm, rotary embedding with YaRN."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_export.reference.args import ModelArgs
from dsv3_export.reference.fp8 import FP8_DTYPE, scale_shape, weight_dequant


class Linear(nn.Module):
    """y = x W^T. W is dense, or fp8 e4m3 with one fp32 `scale` per 128x128 block (DeepSeek naming).

    The fp8 path dequantizes in pure torch (the reference semantics); the compiler's
    quantize_fp8_blockwise pass replaces it with dsv3::fp8_linear.
    """

    def __init__(self, in_features: int, out_features: int, *, fp8: bool = False,
                 dtype: torch.dtype = torch.float32, block_size: int = 128):
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        if fp8:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
            self.scale = nn.Parameter(
                torch.empty(*scale_shape(out_features, in_features, block_size), dtype=torch.float32),
                requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
            self.register_parameter("scale", None)

    @property
    def is_fp8(self) -> bool:
        return self.scale is not None

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scale is None:
            return self.weight.to(dtype)
        return weight_dequant(self.weight, self.scale, dtype, self.block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8={self.is_fp8}"


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (self.dim,), self.weight.float(), self.eps)
        return y.to(x.dtype)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotation frequencies [qk_rope_head_dim/2], YaRN-blended when max_seq_len > original.

    Exactly DeepSeek's precompute_freqs_cis before the outer product with positions.
    """
    dim, base, factor = args.qk_rope_head_dim, args.rope_theta, args.rope_factor
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if not args.yarn_enabled:
        return freqs

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(args.original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(args.beta_fast)), 0)
    high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    return freqs / factor * (1 - smooth) + freqs * smooth


def rope_tables(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_seq_len, qk_rope_head_dim/2] in fp32 (the real form of freqs_cis)."""
    positions = torch.arange(args.max_seq_len, dtype=torch.float32, device="cpu")
    angles = torch.outer(positions, rope_frequencies(args))  # [S, R/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the last dim by the angles in cos/sin.

    x: [b, s, h, r]; cos, sin: [s, r/2] (shared positions) or [b, s, r/2] (per-row positions).
    Equal to DeepSeek's complex multiply view_as_complex(x) * freqs_cis, written with real ops
    so that it exports to ONNX.
    """
    dtype = x.dtype
    pairs = x.float().unflatten(-1, (-1, 2))  # [b, s, h, r/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]  # [b, s, h, r/2]
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # [1, s, r/2]
    c = cos[:, :, None, :]  # [b|1, s, 1, r/2]
    s = sin[:, :, None, :]
    y = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)  # [b, s, h, r/2, 2]
    return y.flatten(-2).to(dtype)
