"""FP8 e4m3 blockwise quantization in pure torch: the oracle for passes and kernels.

Weights: one fp32 scale per 128x128 block, `scale` shape [ceil(N/128), ceil(K/128)]; the last
block row/column may be ragged (DeepSeek-V2-Lite's 576-wide wkv_a, 10944-wide MLP).
Activations: one fp32 scale per 1x128 block along the last dim, shape [..., ceil(K/128)].
dequant(q, s) = q.float() * s (broadcast over the block). quant uses s = amax / 448, with amax
clamped so that an all-zero block gets a tiny finite scale instead of 0 (no NaN on dequant).
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
# amax floor: an all-zero block quantizes to zeros with this finite scale (never 0/0).
AMAX_FLOOR = 1e-12


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def scale_shape(out_features: int, in_features: int, block_size: int = 128) -> tuple[int, int]:
    return cdiv(out_features, block_size), cdiv(in_features, block_size)


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, block_size: int) -> torch.Tensor:
    """[nb_r, nb_c] block scales -> [rows, cols] elementwise scales (ragged edges cut)."""
    full = scale.repeat_interleave(block_size, dim=0).repeat_interleave(block_size, dim=1)
    return full[:rows, :cols]


def weight_dequant(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                   block_size: int = 128) -> torch.Tensor:
    """fp8 [N, K] + fp32 [ceil(N/b), ceil(K/b)] -> dense [N, K] in `dtype`."""
    n, k = weight.shape
    expected = scale_shape(n, k, block_size)
    if tuple(scale.shape) != expected:
        raise ValueError(f"fp8 weight {tuple(weight.shape)} needs scale shape {expected}, got {tuple(scale.shape)}")
    w = weight.to(torch.float32) * _expand_blocks(scale.to(torch.float32), n, k, block_size)
    return w.to(dtype)


def weight_quant(weight: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """dense [N, K] -> (fp8 [N, K], fp32 scale [ceil(N/b), ceil(K/b)]), one scale per block."""
    n, k = weight.shape
    nb_r, nb_c = scale_shape(n, k, block_size)
    w = weight.to(torch.float32)
    padded = torch.zeros(nb_r * block_size, nb_c * block_size, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w
    blocks = padded.view(nb_r, block_size, nb_c, block_size)  # [nb_r, b, nb_c, b]
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)  # [nb_r, nb_c]
    scale = amax / FP8_E4M3_MAX
    q = (w / _expand_blocks(scale, n, k, block_size)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    return q, scale


def act_quant(x: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] -> (fp8 [..., K], fp32 scale [..., ceil(K/b)]), one scale per 1 x b block."""
    k = x.shape[-1]
    nb = cdiv(k, block_size)
    xf = x.to(torch.float32)
    padded = torch.nn.functional.pad(xf, (0, nb * block_size - k))
    blocks = padded.unflatten(-1, (nb, block_size))  # [..., nb, b]
    scale = blocks.abs().amax(dim=-1).clamp_min(AMAX_FLOOR) / FP8_E4M3_MAX  # [..., nb]
    q = (blocks / scale.unsqueeze(-1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).flatten(-2)[..., :k]
    return q.to(FP8_DTYPE), scale


def act_dequant(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                block_size: int = 128) -> torch.Tensor:
    k = q.shape[-1]
    s = scale.to(torch.float32).repeat_interleave(block_size, dim=-1)[..., :k]
    return (q.to(torch.float32) * s).to(dtype)
