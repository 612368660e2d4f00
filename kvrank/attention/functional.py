"""Pure functions for attention over independent blocks (Block-Attention / parallel context encoding).

Shapes: B batch, H query heads, Hkv KV heads, Tq query tokens, Tk key tokens, D head dim, S segments.
"""

from __future__ import annotations

from typing import Protocol

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
    lead_segment: int | None = None,
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
        lead_segment: a query segment that every query segment also sees (a lead shared by several queries).

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
        if lead_segment is not None:
            same_or_prefix |= (seg_q >= query_segment) & (seg_k == lead_segment)
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


# Keys per chunk in `chunked_mass_attention` are chosen so one chunk of scores, [Hkv, n_rep * Tq, C] fp32, stays
# about this size: small enough to stay in a core's L2 cache between the two matmuls and the softmax passes.
CHUNK_BYTES = 1024 * 1024


def segment_runs(segment_ids: torch.Tensor) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Runs of equal segment id in one row of key slots: [(start, end)] and each run's segment id."""
    ids, counts = torch.unique_consecutive(segment_ids, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends)), ids


class StoredKeys(Protocol):
    """Key slots [start, start + length) of a row that are not in the key tensor but read chunk by chunk (stored
    blocks decoded where the kernel needs them, instead of assembled into one tensor per layer)."""

    start: int
    length: int

    def kv(self, a: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots a..z-1 (whole segment runs), each [1, Hkv, z - a, D]."""
        ...


def _chunks(runs: list[tuple[int, int]], size: int,
            breaks: frozenset[int] = frozenset()) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Consecutive runs grouped into chunks of about `size` keys: (start, end, the chunk's runs); no chunk spans
    a slot in `breaks`."""
    out: list[tuple[int, int, list[tuple[int, int]]]] = []
    for start, end in runs:
        if out and out[-1][1] - out[-1][0] < size and start not in breaks:
            out[-1] = (out[-1][0], end, out[-1][2] + [(start, end)])
        else:
            out.append((start, end, [(start, end)]))
    return out


def chunked_mass_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    segment_ids: torch.Tensor, n_segments: int, softcap: float | None = None, stored: StoredKeys | None = None,
    plans: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output of `block_attention` and the `segment_mass` of its probabilities, without materialising them.

    q: [1, H, Tq, D]; k, v: [1, Hkv, Tk, D]; mask: [1, 1, Tq, Tk] additive; segment_ids: [1, Tk].
    Returns output [1, H, Tq, D] and mass [1, H, Tq, n_segments] (fp32).
    With `stored`, its slots are read from it and k, v hold only the other Tk - stored.length slots (in order).
    `plans` (a dict kept across the layers of one pass) caches the chunking, which depends only on the segments
    and the mask, so it is worked out once per mask instead of once per layer.

    Keys are read in cache-sized chunks of whole segment runs, with an online softmax (running row maximum and
    normaliser, as in FlashAttention): per chunk one matmul for the scores, one in-place exp, one matmul into the
    output, and one sum per segment run. The mask is added only to chunks where it is not all zero. The arithmetic
    is that of the two attention matmuls; nothing of size Tq x Tk is written to memory.
    """
    b, h, tq, d = q.shape
    hkv = k.shape[1]
    if b != 1:
        raise ValueError(f"chunked_mass_attention takes one row (B = 1), got B = {b}; use block_attention")
    n_rep = h // hkv
    rows = n_rep * tq
    grouped = (q * scale).reshape(1, hkv, rows, d)  # (1, Hkv, n_rep*Tq, D): heads of a group are contiguous
    size = max(256, CHUNK_BYTES // (4 * hkv * rows))
    breaks = frozenset((stored.start, stored.start + stored.length)) if stored is not None else frozenset()
    plan_key = (mask.data_ptr() if mask is not None else 0, tuple(segment_ids.shape), size, stored is not None)
    plan = plans.get(plan_key) if plans is not None else None
    if plan is not None and plan[3] is not mask:  # another mask at a reused address: plan it afresh
        plan = None
    if plan is None:
        runs, run_ids = segment_runs(segment_ids[0])
        chunks = _chunks(runs, size, breaks)
        if mask is not None:  # keys some query cannot see, counted up to each slot
            seen = torch.cumsum((mask != 0).any(dim=2)[0, 0], 0).tolist()
            masked = [seen[end - 1] > (seen[start - 1] if start else 0) for start, end, _ in chunks]
        else:
            masked = [False] * len(chunks)
        plan = (chunks, run_ids, masked, mask)  # holding the mask keeps its address from being reused
        if plans is not None:
            plans[plan_key] = plan
    chunks, run_ids, masked, _ = plan

    def keys_values(a: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:  # (1, Hkv, z - a, D) each
        if stored is None:
            return k[:, :, a:z], v[:, :, a:z]
        if stored.start <= a and z <= stored.start + stored.length:
            return stored.kv(a, z)
        shift = stored.length if a >= stored.start + stored.length else 0
        return k[:, :, a - shift:z - shift], v[:, :, a - shift:z - shift]

    top = torch.full((1, hkv, rows, 1), NEG_INF, dtype=torch.float32, device=q.device)  # running row maximum
    norm = torch.zeros((1, hkv, rows, 1), dtype=torch.float32, device=q.device)
    out = torch.zeros((1, hkv, rows, d), dtype=torch.float32, device=q.device)
    run_sums, run_refs = [], []
    for (start, end, chunk_runs), chunk_masked in zip(chunks, masked):
        keys, values = keys_values(start, end)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).float()  # (1, Hkv, rows, C)
        if softcap is not None:
            scores = torch.tanh(scores / softcap).mul_(softcap)
        if mask is not None and chunk_masked:
            scores.view(1, hkv, n_rep, tq, end - start).add_(mask[:, :, None, :, start:end])
        new_top = torch.maximum(top, scores.amax(dim=-1, keepdim=True))
        ref = new_top.masked_fill(new_top == NEG_INF, 0.0)  # rows that see nothing yet: exp(-inf - 0) = 0
        scores.sub_(ref).exp_()  # unnormalised probabilities relative to the running maximum
        rescale = torch.exp(top - ref)
        norm = norm * rescale + scores.sum(dim=-1, keepdim=True)
        out = out * rescale + torch.matmul(scores.to(values.dtype), values).float()
        run_sums.append(torch.stack([scores[..., a - start:z - start].sum(-1) for a, z in chunk_runs], dim=-1))
        run_refs.append(ref)
        top = new_top
    final = top.masked_fill(top == NEG_INF, 0.0)
    norm = norm.clamp_min(torch.finfo(torch.float32).tiny)
    per_run = torch.cat([s * torch.exp(r - final) for s, r in zip(run_sums, run_refs)], dim=-1) / norm
    mass = torch.zeros((1, hkv, rows, n_segments), dtype=torch.float32, device=q.device)
    mass.index_add_(-1, run_ids.to(q.device), per_run)  # (1, Hkv, rows, S)
    return (out / norm).to(q.dtype).view(1, h, tq, d), mass.view(1, h, tq, n_segments)
