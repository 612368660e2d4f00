"""An attention backend that can report attention mass per segment while the model's own forward runs.

It is registered with transformers' `AttentionInterface` as "kvrank". Outside a `capture_mass` block it is plain
SDPA; inside one it computes, per recorded layer, the attention output and the attention mass that the new tokens
put on each segment of the keys. This lets the `attn` scoring mode read ICR/BlockRank features from the model's own
modules and weights without `output_attentions` materialising every probability: one row (the `attn` pass) runs
`chunked_mass_attention`, which never writes the [Tq, Tk] probabilities; batches of several rows, and passes that
need gradients (training), run the eager `block_attention` and `segment_mass`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvrank.attention.functional import StoredKeys, block_attention, chunked_mass_attention, segment_mass

BACKEND = "kvrank"


@dataclass
class MassCapture:
    """Collects attention mass per layer: `mass[layer]` is [B, H, Tq, S] (fp32)."""

    key_segments: torch.Tensor  # (B, Tk) segment id of every key slot, 0..n_segments-1
    n_segments: int
    layers: frozenset[int] | None = None  # record only these layers (None: all)
    # run the eager reference (`block_attention` + `segment_mass`, every probability materialised) even for one row
    reference: bool = False
    # per layer, the slots the key tensors leave out and the kernel reads itself (set by the block engine when it
    # streams stored blocks instead of assembling them); every layer then runs `chunked_mass_attention`
    stored: Callable[[int], StoredKeys] | None = None
    plans: dict = field(default_factory=dict)  # the kernel's chunking, worked out once per mask for all layers
    mass: dict[int, torch.Tensor] = field(default_factory=dict)


_ACTIVE: ContextVar[MassCapture | None] = ContextVar("kvrank_mass_capture", default=None)
_GROUPED: ContextVar[bool] = ContextVar("kvrank_grouped_sdpa", default=False)


def active_capture() -> MassCapture | None:
    """The capture of the enclosing `capture_mass` block, if any."""
    return _ACTIVE.get()


@contextmanager
def capture_mass(capture: MassCapture) -> Iterator[MassCapture]:
    token = _ACTIVE.set(capture)
    try:
        yield capture
    finally:
        _ACTIVE.reset(token)


@contextmanager
def grouped_sdpa() -> Iterator[None]:
    """Masked SDPA calls in this block read each KV head once for its n_rep query heads (`enable_gqa`) instead of
    transformers' default with a mask, which copies every key and value n_rep times first (`repeat_kv`). The block
    engine's query-time passes use it; plain forwards (prefill, full recompute) are left as transformers runs them."""
    token = _GROUPED.set(True)
    try:
        yield
    finally:
        _GROUPED.reset(token)


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
    if capture is not None and capture.stored is not None and layer is not None:
        out, mass = chunked_mass_attention(query, key, value, _additive(attention_mask),
                                           scaling if scaling is not None else query.shape[-1] ** -0.5,
                                           capture.key_segments, capture.n_segments, softcap=softcap,
                                           stored=capture.stored(layer), plans=capture.plans)  # (1,H,Tq,D), (1,H,Tq,S)
        if capture.layers is None or layer in capture.layers:
            capture.mass[layer] = mass
        return out.transpose(1, 2).contiguous(), None
    if capture is None or (capture.layers is not None and layer not in capture.layers):
        if softcap is None and _GROUPED.get() and attention_mask is not None and dropout == 0.0 \
                and key.shape[1] < query.shape[1] and not (torch.is_grad_enabled() and query.requires_grad):
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask[:, :, :, : key.shape[-2]], scale=scaling,
                enable_gqa=True)  # (B, H, Tq, D)
            return out.transpose(1, 2).contiguous(), None
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = _additive(attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None)
    record = capture is not None and layer is not None and (capture.layers is None or layer in capture.layers)
    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if record and capture is not None and query.shape[0] == 1 and not needs_graph \
            and not capture.reference:
        out, mass = chunked_mass_attention(query, key, value, mask, scale, capture.key_segments,
                                           capture.n_segments, softcap=softcap, plans=capture.plans)
        capture.mass[layer] = mass  # type: ignore[index]
        return out.transpose(1, 2).contiguous(), None
    out, probs = block_attention(query, key, value, mask, scale, softcap=softcap)  # (B,H,Tq,D), (B,H,Tq,Tk)
    if record and capture is not None:
        capture.mass[layer] = segment_mass(probs, capture.key_segments, capture.n_segments)  # type: ignore[index]
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, D), as transformers' backends return


def _additive(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean mask (True = attend) as an additive one; additive masks unchanged."""
    if mask is not None and mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask


AttentionInterface.register(BACKEND, kvrank_attention_forward)
# Plain forwards (no 4D mask given) get the same causal masks SDPA would.
AttentionMaskInterface.register(BACKEND, sdpa_mask)
