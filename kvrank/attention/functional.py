"""Pure functions for attention over independent blocks (Block-Attention / parallel context encoding).

Shapes: B batch, H query heads, Hkv KV heads, Tq query tokens, Tk key tokens, D head dim, S segments.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """GQA/MQA head expansion: [B, Hkv, T, D] -> [B, Hkv * n_rep, T, D] (each KV head serves n_rep query heads)."""
    if n_rep == 1:
        return x
    b, hkv, t, d = x.shape
    return x[:, :, None].expand(b, hkv, n_rep, t, d).reshape(b, hkv * n_rep, t, d)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, D] by the angles whose cos/sin are [..., T, D] (the rotate-half convention of HF models)."""
    return x * cos + _rotate_half(x) * sin


def rerotate(keys: torch.Tensor, cos_delta: torch.Tensor, sin_delta: torch.Tensor) -> torch.Tensor:
    """Move RoPE'd keys [..., T, D] from positions p to p + delta.

    RoPE is a rotation R(p), and R(p + delta) = R(delta) R(p), so keys stored at canonical positions are moved by
    rotating them once more by delta. cos_delta/sin_delta are [..., T, D] (or broadcastable) for the delta angles,
    without any attention-scaling factor folded in.
    """
    return apply_rope(keys, cos_delta, sin_delta)


def block_mask(
    segment_ids: torch.Tensor,
    positions: torch.Tensor,
    query_segment: int | None,
    valid: torch.Tensor | None = None,
    window: int | None = None,
    dtype: torch.dtype = torch.float32,
    last: int | None = None,
) -> torch.Tensor:
    """Additive attention mask for blocks that see only the prefix and themselves, and a query that sees all.

    Args:
        segment_ids: [B, T] int — 0 for the shared prefix, 1..S for blocks, >= `query_segment` for query tokens.
            Slot order in T is the order in the KV cache (stored tokens first, then the new tokens).
        positions: [B, T] int — the RoPE position of each slot (blocks may share positions: parallel encoding).
        query_segment: the first query segment id (None: no query, e.g. during prefill). A query segment attends
            to the prefix, every block and itself, but not to other query segments, so several queries (e.g. a
            real and a content-free one) can share one row over the same blocks.
        valid: [B, T] bool — False for padding slots, which nothing attends to.
        window: sliding-window size: a key is visible only if `q_pos - k_pos < window` (positional distance).
        last: build only the rows of the last `last` slots (the tokens being run now); default all T.

    Returns: [B, 1, R, T] with R = `last` or T: 0 where attention is allowed and -inf elsewhere.
    """
    t = segment_ids.shape[1]
    start = 0 if last is None else t - last
    seg_q, seg_k = segment_ids[:, start:, None], segment_ids[:, None, :]  # (B, R, 1), (B, 1, T)
    pos_q, pos_k = positions[:, start:, None], positions[:, None, :]
    slots = torch.arange(t, device=segment_ids.device)
    causal = slots[None, start:, None] >= slots[None, None, :]  # (1, R, T) by cache order
    same_or_prefix = (seg_k == seg_q) | (seg_k == 0)
    if query_segment is not None:
        same_or_prefix |= (seg_q >= query_segment) & (seg_k < query_segment)
    allowed = causal & same_or_prefix & (pos_k <= pos_q)  # (B, R, T)
    if window is not None:
        allowed &= (pos_q - pos_k) < window
    if valid is not None:
        allowed &= valid[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, NEG_INF)
    return mask[:, None]  # (B, 1, R, T)


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention that also returns the probabilities (needed to read attention mass).

    q: [B, H, Tq, D]; k, v: [B, Hkv, Tk, D] with H a multiple of Hkv; mask: [B, 1, Tq, Tk] additive.
    Returns output [B, H, Tq, D] and probabilities [B, H, Tq, Tk] (fp32).

    GQA without copying K/V: the n_rep query heads of each KV group are stacked along the query axis, so one
    matmul per group reads the group's keys once (repeat_kv would materialise n_rep copies of every block).
    """
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    n_rep = h // hkv
    grouped = q.reshape(b, hkv, n_rep * tq, d)  # (B, Hkv, n_rep*Tq, D): heads of a group are contiguous
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * scale  # (B, Hkv, n_rep*Tq, Tk)
    scores = scores.view(b, h, tq, tk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    out = torch.matmul(probs.view(b, hkv, n_rep * tq, tk).to(v.dtype), v)  # (B, Hkv, n_rep*Tq, D)
    return out.view(b, h, tq, d), probs


def segment_mass(probs: torch.Tensor, segment_ids: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Attention mass per segment: probs [B, H, Tq, Tk], segment_ids [B, Tk] in 0..n_segments-1.

    Returns [B, H, Tq, n_segments]: for each query token and head, the probability mass on each segment's keys.
    """
    one_hot = torch.nn.functional.one_hot(segment_ids.long(), n_segments).to(probs.dtype)  # (B, Tk, S)
    return torch.matmul(probs, one_hot[:, None])  # (B, H, Tq, S)
