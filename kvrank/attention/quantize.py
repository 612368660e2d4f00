"""Symmetric int8 quantisation of stored KV (KIVI-style axes): the first compressed layout.

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
    return quantize(x, axis, bits=8)


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.float() * scale.float()).to(dtype)


def quantize_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_int8(k, axis=1)


def quantize_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_int8(v, axis=2)


def quantize(x: torch.Tensor, axis: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric `bits`-bit codes (8: int8 [Hkv, T, D]; 4: two codes per uint8 [Hkv, T, D/2]) and fp16 scales
    reduced over `axis` (1 = per channel, 2 = per token).

    Every element is within half a step of the original: |x - dequantize(...)| <= scale / 2 (scales as stored).
    """
    if axis not in (1, 2):
        raise ValueError(f"axis must be 1 (per channel, keys) or 2 (per token, values), got {axis}")
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if bits == 4 and x.shape[-1] % 2:
        raise ValueError(f"4-bit codes pack pairs along the last dim, which is odd ({x.shape[-1]})")
    qmax = QMAX if bits == 8 else 7
    scale = x.abs().amax(dim=axis, keepdim=True).float() / qmax  # (Hkv, 1, D) or (Hkv, T, 1)
    scale = scale.to(torch.float16).float().clamp_min(torch.finfo(torch.float16).tiny)  # the scale as stored
    codes = torch.round(x.float() / scale).clamp_(-qmax, qmax)
    if bits == 8:
        return codes.to(torch.int8), scale.to(torch.float16)
    nibbles = (codes + 8).to(torch.uint8)  # 1..15
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), scale.to(torch.float16)  # (.., D/2)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize`; the code dtype tells the width (int8: 8 bits, uint8: two 4-bit codes)."""
    if codes.dtype == torch.int8:
        return dequantize_int8(codes, scale, dtype)
    low = (codes & 0x0F).to(torch.int8) - 8
    high = (codes >> 4).to(torch.int8) - 8
    unpacked = torch.stack((low, high), dim=-1).flatten(-2)  # (.., D)
    return (unpacked.float() * scale.float()).to(dtype)
