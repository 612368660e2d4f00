"""int8 KV quantisation: codes and scales have the documented shapes and every element is within half a step."""

from __future__ import annotations

import pytest
import torch

from kvrank.attention.quantize import dequantize_int8, quantize_int8, quantize_keys, quantize_values


@pytest.mark.parametrize("quantize, scale_shape", [(quantize_keys, (3, 1, 64)), (quantize_values, (3, 50, 1))])
def test_roundtrip_is_within_half_a_step(quantize, scale_shape):
    torch.manual_seed(0)
    x = torch.randn(3, 50, 64) * torch.linspace(0.1, 8.0, 64)  # channels of very different ranges (key outliers)
    codes, scale = quantize(x.half())
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and tuple(scale.shape) == scale_shape
    error = (dequantize_int8(codes, scale) - x.half().float()).abs()
    assert torch.all(error <= scale.float() / 2 + 1e-6)
    assert codes.numel() + 2 * scale.numel() < x.half().numel() * 2 * 0.55  # about half the fp16 bytes


def test_per_channel_scales_protect_small_channels_of_keys():
    x = torch.zeros(1, 8, 2)
    x[..., 0] = 100.0  # an outlier channel
    x[..., 1] = torch.linspace(-0.01, 0.01, 8)
    k_codes, k_scale = quantize_keys(x)
    v_codes, v_scale = quantize_values(x)
    key_error = (dequantize_int8(k_codes, k_scale) - x)[..., 1].abs().max()
    value_error = (dequantize_int8(v_codes, v_scale) - x)[..., 1].abs().max()
    assert key_error < 1e-4 < value_error  # per-token scales lose the small channel next to the outlier


def test_zeros_and_bad_axis():
    codes, scale = quantize_int8(torch.zeros(2, 4, 8), axis=1)
    assert torch.all(dequantize_int8(codes, scale) == 0)
    with pytest.raises(ValueError, match="axis must be 1"):
        quantize_int8(torch.zeros(2, 4, 8), axis=0)
