"""An attention backend that can report attention mass per segment while the model's own forward runs.

It is registered with transformers' `AttentionInterface` as "kvrank". Outside a `capture_mass` block it is plain
SDPA; inside one it runs eager attention (`block_attention`) and accumulates, per layer, the attention mass that
the new tokens put on each segment of the keys. This lets the `attn` scoring mode read ICR/BlockRank features
from the model's own modules and weights without `output_attentions` materialising every probability.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvrank.attention.functional import block_attention, segment_mass

BACKEND = "kvrank"


@dataclass
class MassCapture:
    """Collects attention mass per layer: `mass[layer]` is [B, H, Tq, S] (fp32)."""

    key_segments: torch.Tensor  # (B, Tk) segment id of every key slot, 0..n_segments-1
    n_segments: int
    layers: frozenset[int] | None = None  # record only these layers (None: all)
    mass: dict[int, torch.Tensor] = field(default_factory=dict)


_ACTIVE: ContextVar[MassCapture | None] = ContextVar("kvrank_mass_capture", default=None)


@contextmanager
def capture_mass(capture: MassCapture) -> Iterator[MassCapture]:
    token = _ACTIVE.set(capture)
    try:
        yield capture
    finally:
        _ACTIVE.reset(token)


def kvrank_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, Tq, D)
    key: torch.Tensor,  # (B, Hkv, Tk, D)
    value: torch.Tensor,  # (B, Hkv, Tk, D)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    capture = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if capture is None or (capture.layers is not None and layer not in capture.layers):
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    if mask is not None and mask.dtype == torch.bool:  # True = attend
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    out, probs = block_attention(query, key, value, mask, scale, softcap=softcap)  # (B,H,Tq,D), (B,H,Tq,Tk)
    if capture is not None and layer is not None and (capture.layers is None or layer in capture.layers):
        capture.mass[layer] = segment_mass(probs, capture.key_segments, capture.n_segments)  # (B,H,Tq,S)
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, D), as transformers' backends return


AttentionInterface.register(BACKEND, kvrank_attention_forward)
# Plain forwards (no 4D mask given) get the same causal masks SDPA would.
AttentionMaskInterface.register(BACKEND, sdpa_mask)
