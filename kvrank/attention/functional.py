"""Pure functions for attention over independent blocks (Block-Attention / parallel context encoding).

Shapes: B batch, H query heads, Hkv KV heads, Tq query tokens, Tk key tokens, D head dim, S segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from kvrank.attention import native

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
LOG2E = 1.4426950408889634  # scores are kept in log2 units: exp2 is about twice as fast as exp on CPU
# When every row's first-chunk maximum lies within +-RAW_RANGE (log2 units), the exponentials are taken of the raw
# scores (reference 0), which saves one pass over every chunk: each row's total is then above 2^-RAW_RANGE, so
# nothing that matters underflows, and a later score at or above 128 overflows and is caught as before. Only with
# fp32 values: probabilities cast to fp16 (range 2^-14..2^16) would underflow to zero or overflow.
RAW_RANGE = 60.0


def raw_reference(ref: torch.Tensor, values_dtype: torch.dtype) -> bool:
    """Whether exponentials can be taken of the raw scores, given each row's first-chunk maximum `ref`."""
    return values_dtype == torch.float32 and bool((ref.abs() <= RAW_RANGE).all())


def segment_runs(segment_ids: torch.Tensor) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Runs of equal segment id in one row of key slots: [(start, end)] and each run's segment id."""
    ids, counts = torch.unique_consecutive(segment_ids, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends)), ids


class StoredBlock(NamedTuple):
    """One stored block's keys and values at one layer, [Hkv, T, D] each with contiguous rows, as the fused kernel
    reads them: fp32, fp16, or int8 codes with their fp16 scales ([Hkv, 1, D] per channel for keys, [Hkv, T, 1] per
    token for values)."""

    keys: torch.Tensor
    values: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None


class StoredKeys(Protocol):
    """Key slots [start, start + length) of a row that are not in the key tensor but read chunk by chunk (stored
    blocks decoded where the kernel needs them, instead of assembled into one tensor per layer)."""

    start: int
    length: int

    def kv(self, a: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots a..z-1 (whole segment runs), each [1, Hkv, z - a, D]."""
        ...

    def blocks(self) -> list[StoredBlock]:
        """Each non-empty block in slot order (the stored tensors themselves where the kernel can read them, else
        decoded)."""
        ...


@dataclass(frozen=True)
class _Chunk:
    """Key slots [start, end) read together, and how its segment runs are summed: (offset in the chunk, runs,
    run length) for each stretch of consecutive runs of one length (one reshaped sum each)."""

    start: int
    end: int
    groups: tuple[tuple[int, int, int], ...]
    masked: bool  # some query row cannot see some key of the chunk: the mask is added


def _plan(segment_ids: torch.Tensor, mask: torch.Tensor | None, size: int,
          breaks: frozenset[int]) -> tuple[list[_Chunk], torch.Tensor]:
    """Consecutive segment runs grouped into chunks of about `size` keys, none spanning a slot in `breaks`; and
    each run's segment id in order."""
    runs, run_ids = segment_runs(segment_ids[0])
    spans: list[list[tuple[int, int]]] = []
    for start, end in runs:
        if spans and spans[-1][-1][1] - spans[-1][0][0] < size and start not in breaks:
            spans[-1].append((start, end))
        else:
            spans.append([(start, end)])
    seen = torch.cumsum((mask != 0).any(dim=2)[0, 0], 0).tolist() if mask is not None else None
    chunks = []
    for span in spans:
        start, end = span[0][0], span[-1][1]
        groups: list[tuple[int, int, int]] = []
        for a, z in span:
            if groups and groups[-1][2] == z - a:
                groups[-1] = (groups[-1][0], groups[-1][1] + 1, z - a)
            else:
                groups.append((a - start, 1, z - a))
        masked = seen is not None and seen[end - 1] > (seen[start - 1] if start else 0)
        chunks.append(_Chunk(start, end, tuple(groups), masked))
    return chunks, run_ids


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

    Keys are read in cache-sized chunks of whole segment runs: per chunk one matmul for the scores, one in-place
    subtract and exp2, one reshaped sum per stretch of equal-length runs, and one matmul into the output; nothing of
    size Tq x Tk is written to memory. Every chunk's exponentials are taken relative to one reference per row, the
    maximum of the first chunk (a real score, so the row's total is at least 1 and nothing that matters
    underflows): no running maximum and no rescaling per chunk. Where all those maxima lie within `RAW_RANGE` of 0
    the reference is 0 for every row, and the subtract is skipped. A later score more than ~127 (in log2 units)
    above the reference would overflow; the pass then notices the non-finite total and runs again with
    FlashAttention's running maximum (`_Pass.online`).
    """
    b, h, tq, d = q.shape
    hkv = k.shape[1]
    if b != 1:
        raise ValueError(f"chunked_mass_attention takes one row (B = 1), got B = {b}; use block_attention")
    rows = h // hkv * tq
    size = max(256, CHUNK_BYTES // (4 * hkv * rows))
    breaks = frozenset((stored.start, stored.start + stored.length)) if stored is not None else frozenset()
    plan_key = (mask.data_ptr() if mask is not None else 0, tuple(segment_ids.shape), size, breaks)
    plan = plans.get(plan_key) if plans is not None else None
    if plan is None or plan[2] is not mask:  # none yet, or another mask at a reused address
        plan = (*_plan(segment_ids, mask, size, breaks), mask)  # holding the mask keeps its address from reuse
        if plans is not None:
            plans[plan_key] = plan
    chunks, run_ids, _ = plan
    pass_ = _Pass(q, k, v, mask, scale * LOG2E, softcap * LOG2E if softcap is not None else None, stored)
    fused = _fused(pass_, chunks, stored) if stored is not None and softcap is None else None
    if fused is not None:
        out, per_run = fused
    else:
        fixed, per_run = pass_.fixed_reference(chunks)
        out, per_run = (fixed, per_run) if fixed is not None else pass_.online(chunks)
    mass = torch.zeros((1, hkv, rows, n_segments), dtype=torch.float32, device=q.device)
    mass.index_add_(-1, run_ids.to(q.device), per_run)  # (1, Hkv, rows, S)
    return out.to(q.dtype).view(1, h, tq, d), mass.view(1, h, tq, n_segments)


class _Pass:
    """One layer's attention over chunks; scores in log2 units (q scaled by scale x log2 e)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                 softcap: float | None, stored: StoredKeys | None):
        b, h, tq, d = q.shape
        self.hkv, self.n_rep, self.tq, self.d = k.shape[1], h // k.shape[1], tq, d
        self.rows = self.n_rep * tq
        self.grouped = (q * scale).reshape(1, self.hkv, self.rows, d)  # (1, Hkv, n_rep*Tq, D): a group's heads
        self.k, self.v, self.mask, self.softcap, self.stored = k, v, mask, softcap, stored

    def keys_values(self, a: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:  # (1, Hkv, z - a, D) each
        stored, k, v = self.stored, self.k, self.v
        if stored is None:
            return k[:, :, a:z], v[:, :, a:z]
        if stored.start <= a and z <= stored.start + stored.length:
            return stored.kv(a, z)
        shift = stored.length if a >= stored.start + stored.length else 0
        return k[:, :, a - shift:z - shift], v[:, :, a - shift:z - shift]

    def scores(self, chunk: _Chunk, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the chunk (1, Hkv, rows, C) fp32 plus `shift` (1, Hkv, rows, 1), masked; and its values."""
        keys, values = self.keys_values(chunk.start, chunk.end)
        scores = torch.matmul(self.grouped, keys.transpose(-1, -2)).float()  # (1, Hkv, rows, C)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap).mul_(self.softcap)
        if shift is not None:
            scores.add_(shift)
        if chunk.masked and self.mask is not None:
            scores.view(1, self.hkv, self.n_rep, self.tq, chunk.end - chunk.start).add_(
                self.mask[:, :, None, :, chunk.start:chunk.end])
        return scores, values

    def run_sums(self, p: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
        """Sum of p (1, Hkv, rows, C) over each segment run of the chunk: (1, Hkv, rows, runs)."""
        sums = [p[..., o:o + n * length].view(1, self.hkv, self.rows, n, length).sum(-1)
                for o, n, length in chunk.groups]
        return sums[0] if len(sums) == 1 else torch.cat(sums, dim=-1)

    def fixed_reference(self, chunks: list[_Chunk]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Output (1, Hkv, rows, D) and per-run mass (1, Hkv, rows, runs) with one reference per row; output None
        where a score overflowed it."""
        out = torch.zeros((1, self.hkv, self.rows, self.d), dtype=torch.float32, device=self.grouped.device)
        scores, values = self.scores(chunks[0])
        ref = scores.amax(dim=-1, keepdim=True)
        ref.masked_fill_(ref == NEG_INF, 0.0)  # a row that sees nothing here: exp2(-inf - 0) = 0
        shift: torch.Tensor | None = None
        if not raw_reference(ref, values.dtype):
            scores.sub_(ref)
            shift = -ref
        sums = []
        for i, chunk in enumerate(chunks):
            if i:
                scores, values = self.scores(chunk, shift)
            scores.exp2_()  # unnormalised probabilities, relative to the reference
            sums.append(self.run_sums(scores, chunk))
            if values.dtype == out.dtype:
                # the add inside the matmul, one op; out of place because FlopCounterMode counts baddbmm, not baddbmm_
                out = torch.baddbmm(out[0], scores[0], values[0])[None]  # (Hkv, rows, D) + (Hkv,rows,C) @ (Hkv,C,D)
            else:
                out.add_(torch.matmul(scores.to(values.dtype), values))
        per_run = torch.cat(sums, dim=-1)
        norm = per_run.sum(dim=-1, keepdim=True)
        if not (bool(torch.isfinite(norm).all()) and bool((norm > 0).all()) and bool(torch.isfinite(out).all())):
            return None, per_run
        return out / norm, per_run / norm

    def online(self, chunks: list[_Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """The same with a running maximum per row and rescaling, as in FlashAttention (never overflows)."""
        out, per_run, _ = self.online_parts(chunks)
        norm = per_run.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return out / norm, per_run / norm

    def online_parts(self, chunks: list[_Chunk]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`online` before normalising: output (1, Hkv, rows, D), per-run sums (1, Hkv, rows, runs) and each row's
        maximum score (1, Hkv, rows, 1), -inf where a row saw no key; output and sums are relative to that maximum
        (and are 0 where it is -inf)."""
        top = torch.full((1, self.hkv, self.rows, 1), NEG_INF, dtype=torch.float32, device=self.grouped.device)
        out = torch.zeros((1, self.hkv, self.rows, self.d), dtype=torch.float32, device=self.grouped.device)
        sums, tops = [], []
        for chunk in chunks:
            scores, values = self.scores(chunk)
            new_top = torch.maximum(top, scores.amax(dim=-1, keepdim=True))
            ref = new_top.masked_fill(new_top == NEG_INF, 0.0)  # rows that see nothing yet: exp2(-inf - 0) = 0
            scores.sub_(ref).exp2_()
            rescale = torch.exp2(top - ref)
            chunk_sums = self.run_sums(scores, chunk)
            out = out * rescale + torch.matmul(scores.to(values.dtype), values).float()
            sums.append(chunk_sums)
            tops.append(new_top)  # -inf where the row has seen nothing: its sums (all 0) scale by exp2(-inf) = 0
            top = new_top
        final = top.masked_fill(top == NEG_INF, 0.0)
        if not sums:
            return out, torch.zeros((1, self.hkv, self.rows, 0), device=out.device), top
        return out, torch.cat([s * torch.exp2(t - final) for s, t in zip(sums, tops)], dim=-1), top


def _fused(pass_: _Pass, chunks: list[_Chunk], stored: StoredKeys) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Output and per-run mass with the stored blocks' chunks done by the fused CPU kernel (`native.block_mass`) and
    the rest (prefix, new tokens) by the chunk loop, their softmax statistics joined; None where the kernel cannot
    take this pass (not the CPU or not fp32, not built here, masked stored keys, other block dtypes, non-finite
    stored keys), and the caller runs the loop."""
    q = pass_.grouped
    if q.device.type != "cpu" or q.dtype != torch.float32:  # checked first: nothing is decoded or compiled for it
        return None
    end = stored.start + stored.length
    inside = [stored.start <= c.start and c.end <= end for c in chunks]
    if any(c.masked for c, i in zip(chunks, inside) if i) or not native.available():
        return None
    blocks = stored.blocks()
    keys, values = [b.keys for b in blocks], [b.values for b in blocks]
    key_scales = [b.key_scales for b in blocks if b.key_scales is not None]
    value_scales = [b.value_scales for b in blocks if b.value_scales is not None]
    run_lengths = [length for c, i in zip(chunks, inside) if i for _, n, length in c.groups for _ in range(n)]
    if [k.shape[1] for k in keys] != run_lengths or not native.supports(q[0], keys, values, key_scales, value_scales):
        return None
    out_s, sums_s, top_s = (t[None] for t in native.block_mass(q[0], keys, values, key_scales, value_scales,
                                                                 torch.get_num_threads()))
    if not bool(torch.isfinite(top_s).all()):  # NaN or inf in stored KV: the loop lets it show, as the model would
        return None
    others = [c for c, i in zip(chunks, inside) if not i]
    before = sum(n for c in others if c.end <= stored.start for _, n, _ in c.groups)
    out_o, sums_o, top_o = pass_.online_parts(others)
    top = torch.maximum(top_s, top_o)
    mine, theirs = torch.exp2(top_s - top), torch.exp2(top_o - top)  # (1, Hkv, rows, 1) each, at most 1
    out = out_s * mine + out_o * theirs
    per_run = torch.cat([sums_o[..., :before] * theirs, sums_s * mine, sums_o[..., before:] * theirs], dim=-1)
    norm = per_run.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return out / norm, per_run / norm
