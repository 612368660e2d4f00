"""The block-attention math on hand-sized inputs."""

from __future__ import annotations

import math

import pytest
import torch

from kvrank.attention import functional
from kvrank.attention.functional import apply_rope, block_attention, block_mask, repeat_kv, rerotate, segment_mass


def rope(positions: torch.Tensor, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    angles = positions[:, None].float() * inv[None]  # (T, D/2)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def test_repeat_kv_serves_each_kv_head_to_its_query_group():
    kv = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)  # (B, Hkv=2, T, D)
    out = repeat_kv(kv, 3)
    assert out.shape == (1, 6, 3, 4)
    assert torch.equal(out[0, 0], kv[0, 0]) and torch.equal(out[0, 2], kv[0, 0]) and torch.equal(out[0, 3], kv[0, 1])
    assert repeat_kv(kv, 1) is kv


def test_rerotate_equals_rotating_at_the_target_position():
    torch.manual_seed(0)
    k = torch.randn(2, 5, 8)  # (Hkv, T, D)
    stored = apply_rope(k, *rope(torch.arange(3, 8), 8))  # canonical positions 3..7
    moved = rerotate(stored, *rope(torch.full((5,), 40), 8))  # shift by 40
    direct = apply_rope(k, *rope(torch.arange(43, 48), 8))
    assert torch.allclose(moved, direct, atol=1e-5)


def test_rope_keeps_dot_products_relative():
    torch.manual_seed(1)
    q, k = torch.randn(1, 8), torch.randn(1, 8)
    a = apply_rope(q, *rope(torch.tensor([10]), 8)) @ apply_rope(k, *rope(torch.tensor([4]), 8)).T
    b = apply_rope(q, *rope(torch.tensor([106]), 8)) @ apply_rope(k, *rope(torch.tensor([100]), 8)).T
    assert torch.allclose(a, b, atol=1e-4)


def test_block_mask_prefix_blocks_and_query():
    # slots: prefix(2) | block1(2) | block2(2) | query(2); parallel blocks share positions 2,3.
    segments = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]])
    positions = torch.tensor([[0, 1, 2, 3, 2, 3, 4, 5]])
    allowed = block_mask(segments, positions, query_segment=3)[0, 0] == 0  # (T, T)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],  # block 1 sees the prefix and itself
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],  # block 2 does not see block 1
        [1, 1, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0],  # the query sees everything before it
        [1, 1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    last = block_mask(segments, positions, query_segment=3, last=2)
    assert last.shape == (1, 1, 2, 8) and torch.equal(last[0, 0] == 0, expected[-2:])


def test_block_mask_padding_and_positional_window():
    segments = torch.tensor([[0, 1, 1, 1, 2]])
    positions = torch.tensor([[0, 1, 2, 3, 4]])
    valid = torch.tensor([[True, True, False, True, True]])
    allowed = block_mask(segments, positions, 2, valid=valid, window=3)[0, 0] == 0
    assert allowed[4].tolist() == [False, False, False, True, True]  # window 3: positions 2..4, slot 2 is padding
    assert allowed[3].tolist() == [False, True, False, True, False]


def test_block_attention_matches_softmax_by_hand_and_segment_mass_sums_to_one():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out, probs = block_attention(q, k, v, None, scale=1 / math.sqrt(8))
    k_full = repeat_kv(k, 2)
    ref = torch.softmax(q @ k_full.transpose(-1, -2) / math.sqrt(8), dim=-1)
    assert torch.allclose(probs, ref, atol=1e-6)
    assert torch.allclose(out, ref @ repeat_kv(v, 2), atol=1e-6)
    mass = segment_mass(probs, torch.tensor([[0, 1, 1, 2, 2]]), 3)  # (B, H, Tq, S)
    assert torch.allclose(mass.sum(-1), torch.ones(1, 4, 1), atol=1e-6)
    assert torch.allclose(mass[..., 1], probs[..., 1] + probs[..., 2], atol=1e-6)


def test_query_segments_share_blocks_but_not_each_other():
    # prefix(1) | block(2) | query A(2) | query B(2)
    segments = torch.tensor([[0, 1, 1, 2, 2, 3, 3]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 3, 4]])
    allowed = block_mask(segments, positions, query_segment=2)[0, 0] == 0
    assert allowed[5].tolist() == [True, True, True, False, False, True, False]
    assert allowed[6].tolist() == [True, True, True, False, False, True, True]
    assert allowed[4].tolist() == [True, True, True, True, True, False, False]


class _Stored:
    """Slots [start, start + length) of k, v handed out chunk by chunk (as the block engine streams stored blocks)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, start: int, length: int):
        self.k, self.v, self.start, self.length = k, v, start, length
        self.reads: list[tuple[int, int]] = []

    def kv(self, a: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads.append((a, z))
        return self.k[:, :, a:z], self.v[:, :, a:z]


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_mass_attention_equals_eager_probabilities(monkeypatch, softcap):
    """Output and per-segment mass of the chunked online softmax equal the eager reference, over many chunks, a mask
    that hides keys inside blocks (sliding windows), and stored slots read through `StoredKeys`."""
    monkeypatch.setattr(functional, "CHUNK_BYTES", 1)  # the 256-key minimum: several chunks
    torch.manual_seed(0)
    seg = torch.tensor([[0] * 3 + [1] * 7 + [2] * 300 + [3] * 260 + [4] * 2 + [5] * 5])  # prefix, 3 blocks, 2 queries
    tk, tq = seg.shape[1], 7
    q, k, v = torch.randn(1, 4, tq, 8) * 3, torch.randn(1, 2, tk, 8), torch.randn(1, 2, tk, 8)
    mask = torch.zeros(1, 1, tq, tk)
    mask[..., 3:10] = float("-inf")  # a whole block hidden
    mask[..., 1, 100:200] = float("-inf")  # part of a block, for one query token
    mask[..., -tq:] = torch.triu(torch.full((tq, tq), float("-inf")), 1)
    out, probs = block_attention(q, k, v, mask, 0.3, softcap=softcap)
    ref = segment_mass(probs, seg, 6)
    fast_out, fast_mass = functional.chunked_mass_attention(q, k, v, mask, 0.3, seg, 6, softcap=softcap)
    assert torch.allclose(fast_out, out, atol=1e-5) and torch.allclose(fast_mass, ref, atol=1e-6)
    stored = _Stored(k, v, 3, 567)
    keep = torch.cat([torch.arange(3), torch.arange(570, tk)])  # what the key tensors then hold
    s_out, s_mass = functional.chunked_mass_attention(q, k[:, :, keep], v[:, :, keep], mask, 0.3, seg, 6,
                                                      softcap=softcap, stored=stored, plans={})
    assert torch.allclose(s_out, out, atol=1e-5) and torch.allclose(s_mass, ref, atol=1e-6)
    assert len(stored.reads) >= 2 and all(3 <= a < z <= 570 for a, z in stored.reads)


def test_chunked_mass_attention_falls_back_when_a_later_chunk_overflows_the_reference(monkeypatch):
    """Exponentials are taken relative to the first chunk's row maximum; a later block whose scores lie far above
    it (here ~1000 in log2 units) would overflow, so the pass runs again with a running maximum and still equals
    the eager reference. A pass whose scores stay in range does not take the second pass."""
    monkeypatch.setattr(functional, "CHUNK_BYTES", 1)
    online = []
    real_online = functional._Pass.online
    monkeypatch.setattr(functional._Pass, "online", lambda self, chunks: online.append(1) or real_online(self, chunks))
    torch.manual_seed(1)
    seg = torch.tensor([[0] * 4 + [1] * 300 + [2] * 280 + [3] * 3])
    tk, tq = seg.shape[1], 3
    q, k, v = torch.randn(1, 4, tq, 8), torch.randn(1, 2, tk, 8), torch.randn(1, 2, tk, 8)
    mask = torch.zeros(1, 1, tq, tk)
    mask[..., -tq:] = torch.triu(torch.full((tq, tq), float("-inf")), 1)
    for boost, fallback in ((1.0, False), (300.0, True)):
        online.clear()
        k2 = k.clone()
        k2[:, :, 304:584] = q.reshape(1, 2, -1, 8).mean(2, keepdim=True) * boost  # keys aligned with the queries
        out, probs = block_attention(q, k2, v, mask, 0.3)
        fast_out, fast_mass = functional.chunked_mass_attention(q, k2, v, mask, 0.3, seg, 4)
        assert torch.allclose(fast_out, out, atol=1e-5)
        assert torch.allclose(fast_mass, segment_mass(probs, seg, 4), atol=1e-6)
        assert bool(online) is fallback


def test_chunked_mass_attention_shifts_large_scores_and_takes_small_ones_raw(monkeypatch):
    """Scores whose first-chunk row maxima lie within `RAW_RANGE` are exponentiated as they are (reference 0); larger
    ones relative to those maxima. Here the first block scores ~100 and the second ~130 (log2 units): raw, the
    second would overflow 2^128 and force the second pass; shifted by ~100 it stays in range. Both regimes equal the
    eager reference, and neither takes the second pass."""
    monkeypatch.setattr(functional, "CHUNK_BYTES", 1)
    online, raw = [], []
    real_online, real_raw = functional._Pass.online, functional.raw_reference
    monkeypatch.setattr(functional._Pass, "online", lambda self, chunks: online.append(1) or real_online(self, chunks))
    monkeypatch.setattr(functional, "raw_reference", lambda *a: raw.append(real_raw(*a)) or raw[-1])
    torch.manual_seed(2)
    seg = torch.tensor([[0] * 4 + [1] * 300 + [2] * 280 + [3] * 3])
    tk, tq, scale = seg.shape[1], 3, 0.3
    unit = torch.zeros(8)
    unit[0] = 1.0
    mask = torch.zeros(1, 1, tq, tk)
    mask[..., -tq:] = torch.triu(torch.full((tq, tq), float("-inf")), 1)
    v = torch.randn(1, 2, tk, 8)
    for first, second, shifted in ((1.0, 2.0, False), (100.0, 130.0, True)):  # target scores in log2 units
        online.clear()
        raw.clear()
        q = unit.expand(1, 4, tq, 8) * 15.0 + torch.randn(1, 4, tq, 8) * 0.01
        k = torch.randn(1, 2, tk, 8) * 0.1
        per_unit = 15.0 * scale * functional.LOG2E  # log2 score of a key unit * b
        k[:, :, 4:304] = unit * (first / per_unit)
        k[:, :, 304:584] = unit * (second / per_unit)
        out, probs = block_attention(q, k, v, mask, scale)
        fast_out, fast_mass = functional.chunked_mass_attention(q, k, v, mask, scale, seg, 4)
        assert torch.allclose(fast_out, out, atol=1e-5)
        assert torch.allclose(fast_mass, segment_mass(probs, seg, 4), atol=1e-6)
        assert not online and raw == [not shifted]  # one choice per call, taken as the regime says
        if shifted:  # the same scores taken raw overflow, and the pass falls back to the running maximum
            monkeypatch.setattr(functional, "RAW_RANGE", 1e9)
            raw_out, _ = functional.chunked_mass_attention(q, k, v, mask, scale, seg, 4)
            assert online and torch.allclose(raw_out, out, atol=1e-5)
            monkeypatch.setattr(functional, "RAW_RANGE", 60.0)


def test_chunked_mass_attention_in_fp16_never_takes_raw_exponentials():
    """Probabilities cast to fp16 values underflow below 2^-14: a row whose scores all lie near -40 (log2 units)
    taken raw would come out as zeros. With fp16 values the scores are always shifted by the row maximum."""
    torch.manual_seed(0)
    seg = torch.tensor([[0] * 4 + [1] * 300 + [2] * 293 + [3] * 3])
    tk, tq, d, scale = seg.shape[1], 3, 8, 0.3
    mask = torch.zeros(1, 1, tq, tk)
    mask[..., -tq:] = torch.triu(torch.full((tq, tq), float("-inf")), 1)
    unit = torch.zeros(d)
    unit[0] = 1.0
    q = (unit.expand(1, 4, tq, d) * 4.0).clone()
    k = torch.randn(1, 2, tk, d) * 0.01 + unit * (-40.0 / (4.0 * scale * functional.LOG2E))
    v = torch.randn(1, 2, tk, d)
    expected, _ = block_attention(q.double(), k.double(), v.double(), mask.double(), scale)
    out, _ = functional.chunked_mass_attention(q.half(), k.half(), v.half(), mask, scale, seg, 4)
    assert (out.double() - expected).abs().max() < 2e-3
