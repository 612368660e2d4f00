"""Symmetric int8 quantisation of stored KV (KIVI-style axes), the first compressed layout for issue 5.

Keys have outlier *channels*, so they get one scale per (head, channel) over the block's tokens; values are
better behaved per *token*, so they get one scale per (head, token). Each element is then within half a
quantisation step of the original: |x - dequantize(quantize(x))| <= scale / 2.

Shapes follow the KV layout: x is [kv_heads, T, head_dim]; key scales are [kv_heads, 1, head_dim], value scales
[kv_heads, T, 1]; scales are fp16 like the unquantised store.
"""

from __future__ import annotations

import torch

QMAX = 127


def quantize_int8(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [Hkv, T, D] -> (int8 codes [Hkv, T, D], fp16 scales reduced over `axis`: 1 = per channel, 2 = per token)."""
    if axis not in (1, 2):
        raise ValueError(f"axis must be 1 (per channel, keys) or 2 (per token, values), got {axis}")
    scale = x.abs().amax(dim=axis, keepdim=True).float() / QMAX  # (Hkv, 1, D) or (Hkv, T, 1)
    scale = scale.to(torch.float16).float().clamp_min(torch.finfo(torch.float16).tiny)  # the scale as stored
    codes = torch.round(x.float() / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, scale.to(torch.float16)


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.float() * scale.float()).to(dtype)


def quantize_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_int8(k, axis=1)


def quantize_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_int8(v, axis=2)
