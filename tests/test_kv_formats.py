"""Compressed stored-KV formats (`--kv-format`): names, codes, low-rank latents, merged heads, layer selection,
SQA head subsets, the store and the CLI.

Exactness claims are checked against math computed here, independently of `kvformat.py`: the PCA residual comes
from `torch.linalg.svd`, RoPE from this file's own `rope_fn`, head merging from keys built as complex multiples of a
shared plane. Lossy formats are checked against documented bounds measured on the tiny random models of
`conftest_models` (measured maxima over all five architectures, at the time of writing, in `PARITY_BOUNDS`).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from conftest_models import CONFIGS, tiny_lm
from test_reranker_parity import plain_ql
from typer.testing import CliRunner

from kvrank.attention.functional import apply_rope
from kvrank.attention.kvformat import GRAMMAR, KVCodec, KVFormat, fit_basis
from kvrank.attention.quantize import dequantize, dequantize_int8, quantize, quantize_int8
from kvrank.cli import app
from kvrank.errors import KvrankError
from kvrank.pipeline import PipelineConfig, SearchPipeline, build_reranker
from kvrank.reranker.blocks import BlockEngine
from kvrank.reranker.reranker import BlockReranker, RerankerConfig, fit_format_basis
from kvrank.reranker.templates import TEMPLATES
from kvrank.retriever.candidates import CandidatesRetriever
from kvrank.store.disk import DiskKVStore, StoreConfig, StoreIdentity
from kvrank.store.formats import (
    BASIS_FILE,
    FALLBACK_FORMAT,
    RECOMMENDED,
    basis_digest,
    load_basis,
    recommended_format,
    save_basis,
    storage_tag,
)
from kvrank.store.kv import MemoryKVStore, PassageKV, kv_key
from kvrank.store.warm import warm
from kvrank.types import Passage

PASSAGES = [
    Passage("d1", "Cats", "The cat sat on the warm mat."),
    Passage("d2", "Paris", "Paris is the capital of France."),
    Passage("d3", "", "Plants turn light into sugar."),
    Passage("d4", "Rivers", "The Nile is a long river in Africa, flowing north."),
]
CALIBRATION = PASSAGES + [Passage(f"c{i}", f"Note {i}", f"Calibration passage {i} is about item {i * 13} and the "
                                  f"colour number {i % 5}.") for i in range(8)]
QUERY = "capital of France?"
TEMPLATE = TEMPLATES["ql-passage-query"]  # a non-empty shared prefix: canonical positions start after it


# ---------------------------------------------------------------------------------------------- helpers
def rope_fn(head_dim: int, base: float = 10000.0):
    """A RoPE of our own (rotate-half layout): (layer, start, n) -> cos, sin [n, head_dim]."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)

    def rope(layer: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.arange(start, start + n, dtype=torch.float64)[:, None] * inv_freq  # (n, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (n, D)
        return angles.cos().float(), angles.sin().float()

    return rope


def angle_rope(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, D] of arbitrary real angles theta [T, D/2] (one per token and frequency plane)."""
    full = torch.cat((theta, theta), dim=-1)
    return full.cos(), full.sin()


def to_heads(flat: torch.Tensor, hkv: int) -> torch.Tensor:
    """[T, Hkv*D] -> [Hkv, T, D] (the flattening the low-rank formats use: heads side by side)."""
    return flat.reshape(flat.shape[0], hkv, -1).transpose(0, 1)


def from_heads(x: torch.Tensor) -> torch.Tensor:
    """[Hkv, T, D] -> [T, Hkv*D]."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def planted(n: int, rank: int, basis: torch.Tensor, mean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[n, W] rows in the affine subspace `mean + span(basis[:rank])`."""
    return mean + (torch.randn(n, rank, generator=gen) * 3.0) @ basis[:rank]


def relative_error(approx: list[torch.Tensor], exact: list[torch.Tensor], centre: torch.Tensor) -> float:
    """||approx - exact||_F over a list of blocks / ||centre||_F (the centred pre-RoPE data: PCA's normalisation)."""
    num = sum((a - e).double().square().sum() for a, e in zip(approx, exact))
    return math.sqrt(num / centre.double().square().sum())


def pca_residual(x: torch.Tensor, rank: int) -> float:
    """sqrt(sum of discarded eigenvalues / total) of the centred rows of x [N, W], from an SVD."""
    s = torch.linalg.svdvals((x - x.mean(dim=0)).double())
    return (s[rank:].square().sum() / s.square().sum()).sqrt().item()


def codec_for(name: str, keys, values, rope, start: int, hkv: int, d: int) -> KVCodec:
    fmt = KVFormat.parse(name)
    basis = fit_basis(fmt, keys, values, start=start, rope=rope) if fmt.fitted else None
    return KVCodec(fmt, torch.float32, basis, rope, kv_heads=hkv, head_dim=d)


def roundtrip(codec: KVCodec, keys: list[torch.Tensor], values: list[torch.Tensor], start: int):
    """Encode one block's per-layer KV and decode every layer back: (keys, values) per layer."""
    k, v, aux = codec.encode(keys, values, start)
    out = [codec.decode(k[layer], v[layer], aux, layer, start, torch.float32) for layer in range(len(k))]
    return [x for x, _ in out], [y for _, y in out]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def lm(request):
    return tiny_lm(request.param)


@pytest.fixture(scope="module")
def llama():
    return tiny_lm("llama")


def reranker(lm, basis=None, **kw) -> BlockReranker:
    kw.setdefault("template", TEMPLATE)
    return BlockReranker(RerankerConfig(**{"kv_format": "none", **kw}), store=MemoryKVStore(), lm=lm, basis=basis)


def fitted_reranker(lm, calibration=CALIBRATION, **kw) -> BlockReranker:
    """A reranker whose format's basis is fitted the way `build_reranker` does (`fit_format_basis`)."""
    kw.setdefault("template", TEMPLATE)
    config = RerankerConfig(**{"kv_format": "none", **kw})
    basis = fit_format_basis(config, lm, calibration) if config.format.fitted else None
    return BlockReranker(config, store=MemoryKVStore(), lm=lm, basis=basis)


class CallCounter:
    """Counts forward calls of a module (observes the real forward; changes nothing)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1

    def __enter__(self) -> CallCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------------------------- 1. names
@pytest.mark.parametrize("name, canonical", [
    ("none", "none"), ("", "none"), (" NONE ", "none"), ("int8", "int8"), ("INT4", "int4"),
    ("rank32", "rank32"), ("rank8:16", "rank8:16"), ("rank8:8", "rank8"), ("rank08", "rank8"),
    ("int8+rank32", "rank32+int8"), ("int4+layers4+heads1", "heads1+layers4+int4"),
    (" Layers2+Rank4:2 ", "rank4:2+layers2"), ("heads2+int8", "heads2+int8"),
])
def test_names_parse_to_one_canonical_name(name, canonical):
    fmt = KVFormat.parse(name)
    assert fmt.name == canonical
    assert KVFormat.parse(canonical) == fmt and KVFormat.parse(fmt.name).name == canonical


def test_every_constructible_format_round_trips_through_its_name():
    """The name is part of every KV key and of a store's identity, so it must parse back to the same format."""
    bad = []
    for bits, rk, rv, heads, layers in itertools.product((16, 8, 4), (None, 4, 6), (None, 4, 8), (None, 1, 2),
                                                         (None, 3)):
        if (heads is not None and (rk, rv) != (None, None)) or (rk is None) != (rv is None):
            with pytest.raises(KvrankError):  # heads<N> sets its own ranks; ranks come in pairs
                KVFormat(bits=bits, key_rank=rk, value_rank=rv, heads=heads, layers=layers)
            continue
        fmt = KVFormat(bits=bits, key_rank=rk, value_rank=rv, heads=heads, layers=layers)
        try:
            if KVFormat.parse(fmt.name) != fmt:
                bad.append((fmt, fmt.name))
        except KvrankError as err:
            bad.append((fmt, str(err)))
    assert not bad, bad[:3]


@pytest.mark.parametrize("name", ["int16", "int", "rank", "rankx", "rank8:", "heads", "layers", "int8+", "+int8",
                                  "foo", "rank-1", "int8 + rank4", "none+int8"])
def test_bad_names_are_refused_with_the_value_and_the_grammar(name):
    with pytest.raises(KvrankError) as err:
        KVFormat.parse(name)
    assert repr(name) in str(err.value) and GRAMMAR in str(err.value)
    with pytest.raises(KvrankError, match="int8\\|int4"):
        RerankerConfig(kv_format=name)  # the config refuses it at construction, before any model work


@pytest.mark.parametrize("name, message", [
    ("int8+int4", r"sets \['bits'\] twice"), ("rank8+rank4", "twice"), ("heads1+heads2", "twice"),
    ("heads1+rank8", "drop rank or heads"), ("rank4:8+heads2", "drop rank or heads"),
    ("rank0", "key_rank must be >= 1, got 0"), ("rank4:0", "value_rank must be >= 1, got 0"),
    ("heads0", "heads must be >= 1, got 0"), ("layers0", "layers must be >= 1, got 0"),
])
def test_conflicting_and_empty_components_are_refused(name, message):
    with pytest.raises(KvrankError, match=message):
        KVFormat.parse(name)


@pytest.mark.parametrize("name, message", [
    ("rank33", "key_rank 33 exceeds kv_heads\\*head_dim = 32"),
    ("rank8:40", "value_rank 40 exceeds kv_heads\\*head_dim = 32"),
    ("rank7+int4", "even rank, not 7"), ("rank8:5+int4", "even rank, not 5"),
    ("heads2", "heads2 must divide and be below the model's 2 KV heads"),
    ("heads3", "heads3 must divide and be below"),
    ("layers3", "layers3 exceeds the model's 2"),
])
def test_check_refuses_what_the_model_cannot_take(name, message):
    with pytest.raises(KvrankError, match=message) as err:
        KVFormat.parse(name).check(num_layers=2, kv_heads=2, head_dim=16)
    assert repr(KVFormat.parse(name).name) in str(err.value)


def test_check_accepts_the_limits():
    for name in ("rank32", "rank32:2", "rank7", "rank7+int8", "rank8:6+int4", "heads1", "heads1+int4", "layers2",
                 "layers1+int8", "none"):
        KVFormat.parse(name).check(num_layers=2, kv_heads=2, head_dim=16)
    KVFormat.parse("heads2").check(num_layers=2, kv_heads=4, head_dim=16)
    with pytest.raises(KvrankError, match="heads3 must divide"):
        KVFormat.parse("heads3").check(num_layers=2, kv_heads=4, head_dim=16)


def test_a_model_that_cannot_take_a_format_is_refused_when_the_engine_is_built(lm):
    width = lm.kv_heads * lm.head_dim
    with pytest.raises(KvrankError, match=f"rank{width + 2}"):
        BlockEngine(lm, kv_format=KVFormat.parse(f"rank{width + 2}"), basis={"x": torch.zeros(1)})
    with pytest.raises(KvrankError, match="layers3 exceeds the model's 2"):
        reranker(lm, mode="attn", kv_format="layers3")


# ---------------------------------------------------------------------------------------------- 2. codes
@pytest.mark.parametrize("axis, scale_shape", [(1, (3, 1, 64)), (2, (3, 40, 1))])
def test_int4_round_trip_is_within_half_a_step_and_packs_two_codes_per_byte(axis, scale_shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 64, generator=gen) * torch.linspace(0.05, 9.0, 64)  # channels of very different ranges
    codes, scale = quantize(x, axis=axis, bits=4)
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (3, 40, 32)
    assert scale.dtype == torch.float16 and tuple(scale.shape) == scale_shape
    back = dequantize(codes, scale)
    assert back.dtype == torch.float32 and back.shape == x.shape
    error = (back - x).abs()
    assert torch.all(error <= scale.float() / 2 + 1e-6)
    assert error.max() > scale.float().min() / 8  # 4 bits do lose information: the check above can fail
    # the extreme of every scale group is a full-range code, +-7 steps
    assert torch.equal(back.abs().amax(dim=axis, keepdim=True), 7 * scale.float())


def test_int4_packing_layout_by_hand():
    """Per-token scale 1: codes -7, 7, 0, 1 are stored +8 as nibbles, the even element in the low nibble."""
    x = torch.tensor([[[-7.0, 7.0, 0.0, 1.0]]])
    codes, scale = quantize(x, axis=2, bits=4)
    assert scale.item() == 1.0
    assert codes.tolist() == [[[1 | 15 << 4, 8 | 9 << 4]]]
    assert dequantize(codes, scale).tolist() == x.tolist()


def test_int4_refuses_odd_widths_and_other_bit_counts():
    with pytest.raises(ValueError, match="odd"):
        quantize(torch.zeros(1, 4, 7), axis=1, bits=4)
    with pytest.raises(ValueError, match="bits must be 8 or 4, got 3"):
        quantize(torch.zeros(1, 4, 8), axis=1, bits=3)


@pytest.mark.parametrize("axis", [1, 2])
def test_int8_through_the_generic_entry_points_is_unchanged(axis):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 30, 16, generator=gen) * torch.linspace(0.1, 5.0, 16)).half()
    codes, scale = quantize(x, axis=axis, bits=8)
    old_codes, old_scale = quantize_int8(x, axis)
    assert torch.equal(codes, old_codes) and torch.equal(scale, old_scale) and codes.dtype == torch.int8
    assert torch.equal(dequantize(codes, scale), dequantize_int8(old_codes, old_scale))
    assert torch.all((dequantize(codes, scale) - x.float()).abs() <= scale.float() / 2 + 1e-6)


def test_zeros_quantise_to_zeros_at_both_widths():
    for bits in (8, 4):
        codes, scale = quantize(torch.zeros(2, 3, 8), axis=1, bits=bits)
        assert torch.all(dequantize(codes, scale) == 0)


# ---------------------------------------------------------------------------------------------- 3. low rank
HKV, D, LAYERS, START = 2, 16, 2, 5  # width 32; canonical positions start after a 5-token prefix
WIDTH = HKV * D


def synthetic_blocks(gen: torch.Generator, lengths=(23, 31, 17, 40, 28, 35), rank: int | None = None,
                     basis: torch.Tensor | None = None):
    """Pre-RoPE keys and values [T, W] per block and layer with a decaying spectrum (or planted rank), and the
    post-RoPE keys [Hkv, T, D] a model would store at positions START.. (our own RoPE)."""
    rope = rope_fn(D)
    if basis is None:
        basis = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=gen))[0].T  # orthonormal rows
    spectrum = torch.logspace(0.5, -1.5, WIDTH)  # singular values from ~3 to ~0.03
    mean = basis.sum(dim=0) * 0.5  # a fixed offset outside any planted subspace, the same for every call
    pre, keys, values = [], [], []
    for t in lengths:
        pre_l, k_l, v_l = [], [], []
        for layer in range(LAYERS):
            if rank is None:
                x = mean + (torch.randn(t, WIDTH, generator=gen) * spectrum) @ basis
                y = -mean + (torch.randn(t, WIDTH, generator=gen) * spectrum.flip(0)) @ basis.T
            else:
                x = planted(t, rank, basis, mean, gen)
                y = planted(t, rank, basis.flip(0), -mean, gen)
            cos, sin = rope(layer, START, t)
            pre_l.append(x)
            k_l.append(apply_rope(to_heads(x, HKV), cos, sin))  # post-RoPE, as stored by a model
            v_l.append(to_heads(y, HKV))
        pre.append(pre_l)
        keys.append(k_l)
        values.append(v_l)
    return pre, keys, values, rope, basis


def test_full_rank_latent_reconstructs_keys_and_values_exactly():
    """rank = kv_heads*head_dim: the projection is a rotation of the whole space, so encode/decode is the identity
    up to fp32 rounding; this holds only if un-rotating before the projection and re-rotating after are exact."""
    gen = torch.Generator().manual_seed(0)
    _, keys, values, rope, basis = synthetic_blocks(gen)
    codec = codec_for(f"rank{WIDTH}", keys, values, rope, START, HKV, D)
    _, held_k, held_v, _, _ = synthetic_blocks(gen, lengths=(19,), basis=basis)  # not calibration data
    for block_k, block_v in [(keys[0], values[0]), (held_k[0], held_v[0])]:
        stored_k, stored_v, aux = codec.encode(block_k, block_v, START)
        assert aux == {} and tuple(stored_k[0].shape) == (1, block_k[0].shape[1], WIDTH)
        got_k, got_v = roundtrip(codec, block_k, block_v, START)
        for layer in range(LAYERS):
            assert (got_k[layer] - block_k[layer]).abs().max() <= 1e-5
            assert (got_v[layer] - block_v[layer]).abs().max() <= 1e-5


def test_decoding_at_the_wrong_start_position_is_not_exact():
    """The negative control of the test above: the positions used to un-rotate matter (a test that can fail)."""
    gen = torch.Generator().manual_seed(0)
    _, keys, values, rope, _ = synthetic_blocks(gen)
    codec = codec_for(f"rank{WIDTH}", keys, values, rope, START, HKV, D)
    stored_k, stored_v, aux = codec.encode(keys[0], values[0], START)
    wrong, _ = codec.decode(stored_k[0], stored_v[0], aux, 0, START + 3, torch.float32)
    assert (wrong - keys[0][0]).abs().max() > 0.1


@pytest.mark.parametrize("rank", [4, 12, 24])
def test_lower_rank_error_on_calibration_data_is_the_pca_residual(rank):
    """Keys and values at rank r: the relative Frobenius error on the calibration blocks equals
    sqrt(discarded / total eigenvalues) of the centred pre-RoPE data (computed here by SVD). RoPE is a rotation,
    so the post-RoPE error has the pre-RoPE norm."""
    gen = torch.Generator().manual_seed(rank)
    pre, keys, values, rope, _ = synthetic_blocks(gen)
    codec = codec_for(f"rank{rank}", keys, values, rope, START, HKV, D)
    decoded = [roundtrip(codec, k, v, START) for k, v in zip(keys, values)]
    for layer in range(LAYERS):
        pre_k = torch.cat([p[layer] for p in pre])  # (N, W)
        flat_v = torch.cat([from_heads(v[layer]) for v in values])
        got_k = relative_error([d[0][layer] for d in decoded], [k[layer] for k in keys], pre_k - pre_k.mean(0))
        got_v = relative_error([d[1][layer] for d in decoded], [v[layer] for v in values], flat_v - flat_v.mean(0))
        bound_k, bound_v = pca_residual(pre_k, rank), pca_residual(flat_v, rank)
        assert 0.01 < bound_k < 0.99 and 0.01 < bound_v < 0.99  # a real truncation, not a trivial one
        assert got_k <= bound_k + 1e-5 and got_v <= bound_v + 1e-5  # measured: equal to ~1e-8
        assert got_k >= bound_k - 1e-5 and got_v >= bound_v - 1e-5  # PCA is optimal: equality, not just <=


def test_planted_low_rank_structure_reconstructs_at_its_rank_on_new_blocks():
    """Pre-RoPE keys in an r-dimensional affine subspace: rank r recovers unseen blocks from that subspace; their
    post-RoPE keys are not low rank (positions differ), so this needs the projection to be taken before RoPE."""
    gen = torch.Generator().manual_seed(3)
    pre, keys, values, rope, basis = synthetic_blocks(gen, rank=6)
    codec = codec_for("rank6", keys, values, rope, START, HKV, D)
    _, new_k, new_v, _, _ = synthetic_blocks(gen, lengths=(26, 9), rank=6, basis=basis)
    assert torch.linalg.matrix_rank(from_heads(keys[0][0]) - from_heads(keys[0][0]).mean(0)) > 6
    for block_k, block_v in zip(new_k, new_v):
        got_k, got_v = roundtrip(codec, block_k, block_v, START)
        scale = max(block_k[0].abs().max().item(), 1.0)
        for layer in range(LAYERS):
            assert (got_k[layer] - block_k[layer]).abs().max() <= 1e-4 * scale
        # values were planted in another subspace of the same rank, also recovered
        assert max((g - v).abs().max().item() for g, v in zip(got_v, block_v)) <= 1e-4 * scale
    # and one rank less cannot: the bound is tight
    lower = codec_for("rank5", keys, values, rope, START, HKV, D)
    got_k, _ = roundtrip(lower, new_k[0], new_v[0], START)
    assert (got_k[0] - new_k[0][0]).abs().max() > 0.1


def test_the_engines_rope_unrotates_stored_keys_to_the_models_own_pre_rope_keys(lm):
    """The low-rank basis is fitted on un-rotated keys: `BlockEngine.rope` must be each layer's real RoPE (gemma3's
    sliding layers use another base), so un-rotating stored keys gives exactly the keys before the model rotated
    them (the output of k_proj, or of k_norm where the architecture has one)."""
    engine = BlockEngine(lm, torch.float32)
    rr = reranker(lm, mode="ql")
    ids = rr.block_ids(PASSAGES[3])
    p, t = len(rr.prefix_ids), len(ids)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(lm.model.model.layers):
        attn = block.self_attn
        k_norm = getattr(attn, "k_norm", None)

        def hook(_m, _args, out, layer=layer, norm=k_norm):
            k = out[0].reshape(out.shape[1], lm.kv_heads, lm.head_dim).transpose(0, 1)  # (Hkv, T, D)
            captured[layer] = norm(k) if norm is not None else k  # qwen3/gemma3 normalise each head's key

        handles.append(attn.k_proj.register_forward_hook(hook))
    try:
        (kv,) = engine.prefill(rr.prefix_ids, [ids], [kv_key("x", [], ids, "t")])
    finally:
        for handle in handles:
            handle.remove()
    for layer in range(lm.num_layers):
        cos, sin = engine.rope(layer, p, t)
        unrotated = apply_rope(kv.keys[layer], cos, -sin)  # (Hkv, T, D)
        assert (unrotated - captured[layer][:, p:p + t]).abs().max() <= 1e-5
        wrong_cos, wrong_sin = engine.rope(layer, p + 1, t)
        assert (apply_rope(kv.keys[layer], wrong_cos, -wrong_sin) - captured[layer][:, p:p + t]).abs().max() > 1e-3


def test_separate_key_and_value_ranks_store_latents_of_their_widths():
    gen = torch.Generator().manual_seed(4)
    _, keys, values, rope, _ = synthetic_blocks(gen)
    codec = codec_for("rank4:10+int8", keys, values, rope, START, HKV, D)
    k, v, aux = codec.encode(keys[0], values[0], START)
    t = keys[0][0].shape[1]
    assert [tuple(x.shape) for x in k] == [(1, t, 4)] * LAYERS and [tuple(x.shape) for x in v] == [(1, t, 10)] * 2
    assert all(x.dtype == torch.int8 for x in k + v)
    assert sorted(aux) == ["ks.0", "ks.1", "vs.0", "vs.1"] and tuple(aux["ks.0"].shape) == (1, 1, 4)


def test_a_fitted_format_without_its_basis_is_refused():
    with pytest.raises(KvrankError, match="rank8.*fitted on calibration passages"):
        KVCodec(KVFormat.parse("rank8"), rope=rope_fn(16), kv_heads=2, head_dim=16)


# ---------------------------------------------------------------------------------------------- 4. head merging
def head_mix(gen: torch.Generator, hkv: int, f: int) -> torch.Tensor:
    """Complex coefficients a[h, f]: how each KV head scales the shared plane of its group."""
    return torch.complex(torch.randn(hkv, f, generator=gen), torch.randn(hkv, f, generator=gen))


def complex_multiple_keys(gen: torch.Generator, coeff: torch.Tensor, groups: int, t: int) -> torch.Tensor:
    """Keys [Hkv, T, D] whose RoPE planes are z[h, t, f] = coeff[h, f] * shared[group(h), t, f]."""
    hkv, f = coeff.shape
    shared = torch.complex(torch.randn(groups, t, f, generator=gen), torch.randn(groups, t, f, generator=gen))
    z = shared.repeat_interleave(hkv // groups, dim=0) * coeff[:, None]  # (Hkv, T, F)
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("hkv, heads", [(2, 1), (4, 1), (4, 2)])
def test_keys_that_are_complex_multiples_of_a_shared_plane_merge_exactly(hkv, heads):
    """Per layer, every block's heads scale one shared plane per group by the same complex coefficients: the merged
    head (one per group) keeps everything, on calibration blocks and on unseen blocks with new shared planes."""
    gen = torch.Generator().manual_seed(hkv * 10 + heads)
    d = 16
    mix = [head_mix(gen, hkv, d // 2) for _ in range(LAYERS)]

    def blocks(lengths):
        keys = [[complex_multiple_keys(gen, mix[layer], heads, t) for layer in range(LAYERS)] for t in lengths]
        return keys, [[torch.randn(hkv, t, d, generator=gen) for _ in range(LAYERS)] for t in lengths]

    keys, values = blocks((21, 30, 14))
    codec = codec_for(f"heads{heads}", keys, values, rope_fn(d), START, hkv, d)
    new_keys, new_values = blocks((12, 27))
    for block_k, block_v in zip(keys + new_keys, values + new_values):
        stored, _, _ = codec.encode(block_k, block_v, START)
        assert tuple(stored[0].shape) == (heads, block_k[0].shape[1], d)
        got_k, _ = roundtrip(codec, block_k, block_v, START)
        for layer in range(LAYERS):
            assert (got_k[layer] - block_k[layer]).abs().max() <= 1e-5
    # negative control: heads mixed with other coefficients than the fitted ones lose information
    other = [complex_multiple_keys(gen, head_mix(gen, hkv, d // 2), heads, 12) for _ in range(LAYERS)]
    got_k, _ = roundtrip(codec, other, [torch.randn(hkv, 12, d, generator=gen)] * LAYERS, START)
    assert (got_k[0] - other[0]).abs().max() > 0.1
    # with int8 codes of the merged head on top, the error is that of the codes
    coded = codec_for(f"heads{heads}+int8", keys, values, rope_fn(d), START, hkv, d)
    got_k, _ = roundtrip(coded, new_keys[0], new_values[0], START)
    assert 0 < (got_k[0] - new_keys[0][0]).abs().max() <= 0.02 * new_keys[0][0].abs().max()


def test_merging_commutes_with_rope_at_arbitrary_angles():
    """Rotating every head's plane f by the same angle and merging equals merging and then rotating; likewise for
    reconstruction. Holds for any keys (no structure) and any real angles per token and plane."""
    gen = torch.Generator().manual_seed(5)
    hkv, d, t = 4, 16, 25
    keys = [[torch.randn(hkv, n, d, generator=gen) for _ in range(LAYERS)] for n in (30, 18)]
    values = [[torch.randn(hkv, n, d, generator=gen) for _ in range(LAYERS)] for n in (30, 18)]
    for name in ("heads1", "heads2"):
        codec = codec_for(name, keys, values, rope_fn(d), START, hkv, d)
        k = torch.randn(hkv, t, d, generator=gen)
        v = torch.randn(hkv, t, d, generator=gen)
        cos, sin = angle_rope(torch.rand(t, d // 2, generator=gen) * 100 - 50)
        merged = codec.encode([k], [v], START)[0][0]
        merged_rotated = codec.encode([apply_rope(k, cos, sin)], [v], START)[0][0]
        assert (merged_rotated - apply_rope(merged, cos, sin)).abs().max() <= 1e-5
        stored_v = codec.encode([k], [v], START)[1][0]
        rebuilt = codec.decode(merged, stored_v, {}, 0, START, torch.float32)[0]
        rebuilt_rotated = codec.decode(apply_rope(merged, cos, sin), stored_v, {}, 0, START, torch.float32)[0]
        assert (rebuilt_rotated - apply_rope(rebuilt, cos, sin)).abs().max() <= 1e-5
        assert (rebuilt - k).abs().max() > 0.1  # random keys are not exactly mergeable: the test is not vacuous


# ---------------------------------------------------------------------------------------------- 5. uncompressed
def test_uncompressed_format_stores_exactly_what_prefill_stored_before(lm):
    rr = reranker(lm, mode="ql", batch_size=3)
    assert rr.storage_tag == "dtype=float16;compute=float32;format=none"  # stores warmed before stay valid
    stored, prefilled = rr.passage_kv(PASSAGES)
    assert prefilled == len(PASSAGES)
    ids = [rr.block_ids(p) for p in PASSAGES]
    keys = [kv_key(rr.engine.fingerprint, rr.prefix_ids, x, "dtype=float16;compute=float32;format=none")
            for x in ids]
    assert [kv.key for kv in stored] == keys
    fp32 = BlockEngine(lm, torch.float32, batch_size=3).prefill(rr.prefix_ids, ids, keys)
    for kv, ref in zip(stored, fp32):
        assert kv.aux == {} and len(kv.keys) == lm.num_layers
        for got, want in zip(kv.keys + kv.values, ref.keys + ref.values):
            assert got.dtype == torch.float16 and torch.equal(got, want.half())


def test_uncompressed_ql_still_equals_a_plain_forward(lm):
    for kv_format in ("none", "layers2"):  # layers2 on a 2-layer model stores everything: the same scores
        rr = reranker(lm, mode="ql", storage_dtype="float32", kv_format=kv_format)
        scores = rr.score(QUERY, PASSAGES)
        for passage, score in zip(PASSAGES, scores):
            assert abs(score - plain_ql(rr, passage, QUERY)) <= 1e-4


# ---------------------------------------------------------------------------------------------- 6. parity
# Max |score - uncompressed fp32 score| measured over the five tiny architectures and both storage dtypes (mean
# log-prob for ql): int8 2.3e-4, int4 3.6e-3, full-width rank 9.5e-6 (0 with fp32 latents), full-width rank + int8
# 2.7e-4, half-width rank 1.5e-2, half-width rank + int4 1.6e-2, full keys + half values 2.1e-2, heads1 1.3e-2,
# heads1 + int8 1.3e-2. Bounds: 2-10x that. Lossy fitted formats on random models are regression bounds only.
PARITY_BOUNDS = {
    "int8": 1e-3, "int4": 1e-2, "rank{W}": 1e-4, "rank{W}+int8": 1e-3, "rank{H}": 4e-2, "rank{H}+int4": 4e-2,
    "heads1": 4e-2, "heads1+int8": 4e-2, "rank{W}:{H}+layers2": 5e-2,
}


@pytest.mark.parametrize("pattern", sorted(PARITY_BOUNDS))
def test_compressed_ql_scores_stay_within_the_documented_bound(lm, pattern):
    width = lm.kv_heads * lm.head_dim
    name = pattern.format(W=width, H=width // 2)
    if name.startswith("heads") and lm.kv_heads == 1:
        with pytest.raises(KvrankError, match=f"{name.split('+')[0]} must divide and be below the model's 1 KV"):
            reranker(lm, basis={"x": torch.zeros(1)}, mode="ql", kv_format=name)
        return
    exact = reranker(lm, mode="ql", storage_dtype="float32").score(QUERY, PASSAGES)
    for storage in ("float32", "float16"):
        rr = fitted_reranker(lm, mode="ql", storage_dtype=storage, kv_format=name)
        scores = rr.score(QUERY, PASSAGES)
        diff = max(abs(a - b) for a, b in zip(scores, exact))
        assert diff <= PARITY_BOUNDS[pattern], (name, storage, diff)
        if name != f"rank{width}":
            assert diff > 0, name  # the compressed path really ran
        assert rr.storage_tag.startswith(f"dtype={storage};compute=float32;format={name}")


def test_compressed_entries_have_the_documented_layout(llama):
    t = len(reranker(llama, mode="ql").block_ids(PASSAGES[1]))
    plain = reranker(llama, mode="ql").passage_kv(PASSAGES[1:2])[0][0]
    cases = {  # format: (key shape, key dtype, value shape, value dtype, aux names per layer)
        "int8": ((2, t, 16), torch.int8, (2, t, 16), torch.int8, 2),
        "int4": ((2, t, 8), torch.uint8, (2, t, 8), torch.uint8, 2),
        "rank12": ((1, t, 12), torch.float16, (1, t, 12), torch.float16, 0),
        "rank12:6+int4": ((1, t, 6), torch.uint8, (1, t, 3), torch.uint8, 2),
        "heads1": ((1, t, 16), torch.float16, (1, t, 16), torch.float16, 0),
        "heads1+int8": ((1, t, 16), torch.int8, (1, t, 16), torch.int8, 2),
        "layers1": ((2, t, 16), torch.float16, (2, t, 16), torch.float16, 0),
    }
    for name, (k_shape, k_dtype, v_shape, v_dtype, n_aux) in cases.items():
        mode = "attn" if name.startswith("layers") else "ql"
        kv = fitted_reranker(llama, mode=mode, kv_format=name).passage_kv(PASSAGES[1:2])[0][0]
        layers = 1 if name == "layers1" else 2
        assert len(kv.keys) == len(kv.values) == layers, name
        assert {(tuple(k.shape), k.dtype, tuple(v.shape), v.dtype) for k, v in zip(kv.keys, kv.values)} == {
            (k_shape, k_dtype, v_shape, v_dtype)}, name
        assert len(kv.aux) == n_aux * layers and all(x.dtype == torch.float16 for x in kv.aux.values()), name
        assert kv.num_tokens == t and kv.nbytes < plain.nbytes, name


@pytest.mark.parametrize("name, bound", [("int8", 2e-3), ("rank{W}", 1e-5), ("heads1+int8", 0.1)])
def test_compressed_attn_features_stay_within_bound(lm, name, bound):
    """attn mode reads the decoded KV too: calibrated features vs the uncompressed fp32 reranker's (max abs
    difference measured: int8 4.0e-4, full-width rank 9e-8, heads1+int8 3.3e-2)."""
    width = lm.kv_heads * lm.head_dim
    name = name.format(W=width)
    if name.startswith("heads") and lm.kv_heads == 1:
        with pytest.raises(KvrankError, match="must divide and be below the model's 1 KV heads"):
            reranker(lm, basis={"x": torch.zeros(1)}, mode="attn", kv_format=name)
        return
    exact = reranker(lm, mode="attn", storage_dtype="float32")
    rr = fitted_reranker(lm, mode="attn", storage_dtype="float32", kv_format=name)
    want = exact.attention_features(QUERY, exact.passage_kv(PASSAGES)[0])
    got = rr.attention_features(QUERY, rr.passage_kv(PASSAGES)[0])
    assert (got - want).abs().max() <= bound


# ---------------------------------------------------------------------------------------------- 7. layers
def test_layer_selection_equals_the_full_models_attn_with_later_layers_weighted_zero(lm):
    gen = torch.Generator().manual_seed(11)
    heads = lm.config.num_attention_heads
    weights = torch.rand(2, heads, generator=gen) + 0.1
    full_w = tuple(tuple(row) for row in weights.tolist())
    zeroed = weights.clone()
    zeroed[1] = 0
    zero_w = tuple(tuple(row) for row in zeroed.tolist())
    for calibrate in (False, True):
        with CallCounter(lm.model.model.layers[1]) as second:
            reference = reranker(lm, mode="attn", calibrate=calibrate, attn_weights=zero_w).score(QUERY, PASSAGES)
        assert second.calls > 0  # the full model's passes do run layer 1 (the counter below can see it)
        rr = reranker(lm, mode="attn", calibrate=calibrate, attn_weights=full_w, kv_format="layers1")
        assert rr.storage_tag == "dtype=float16;compute=float32;format=layers1"
        assert rr.attn_weight_matrix((1, heads)).tolist() == [weights[0].tolist()]  # rows sliced to stored layers
        rr.engine.prefix_kv(rr.prefix_ids)  # the shared prefix runs once through the whole model; blocks do not
        with CallCounter(lm.model.model.layers[1]) as second:
            scores = rr.score(QUERY, PASSAGES)
            stored, _ = rr.passage_kv(PASSAGES)
        assert second.calls == 0  # neither the prefill nor the scoring pass ran layer 1
        assert all(len(kv.keys) == len(kv.values) == 1 for kv in stored)
        assert max(abs(a - b) for a, b in zip(scores, reference)) <= 1e-5


def test_layer_selection_with_codes_stays_within_the_int8_bound(llama):
    reference = reranker(llama, mode="attn", attn_weights=((1.0,) * 4, (0.0,) * 4)).score(QUERY, PASSAGES)
    scores = reranker(llama, mode="attn", attn_weights=((1.0,) * 4, (0.0,) * 4), kv_format="layers1+int8").score(
        QUERY, PASSAGES)
    diff = max(abs(a - b) for a, b in zip(scores, reference))
    assert 0 < diff <= 1e-3


@pytest.mark.parametrize("mode", ["ql", "yesno", "cascade"])
def test_modes_that_read_the_last_layer_refuse_layer_selection(llama, mode):
    with pytest.raises(KvrankError, match=rf"^mode '{mode}' .*kv_format 'layers1' stores 1; use mode='attn'") as err:
        reranker(llama, mode=mode, kv_format="layers1")
    assert err.value.param == "mode"


# ---------------------------------------------------------------------------------------------- 8. SQA heads
def attn_weights_with_top(heads: int, top_layer0: int, gen: torch.Generator) -> torch.Tensor:
    """[2, heads] distinct weights whose `top_layer0` largest magnitudes all sit in layer 0."""
    w = torch.rand(2, heads, generator=gen) * 0.5 + 0.1
    w[0, :top_layer0] = torch.tensor([2.0, -1.9, 1.8, 1.7][:top_layer0])
    return w


@pytest.mark.parametrize("attn_heads", [1, 2, 3])
def test_sqa_keeps_exactly_n_heads_and_stops_after_their_deepest_layer(lm, attn_heads):
    gen = torch.Generator().manual_seed(attn_heads)
    heads = lm.config.num_attention_heads
    w = attn_weights_with_top(heads, 3, gen)
    as_tuple = tuple(tuple(r) for r in w.tolist())
    rr = reranker(lm, mode="attn", attn_weights=as_tuple, attn_heads=attn_heads)
    matrix = rr.attn_weight_matrix((2, heads))
    kept = matrix.flatten().nonzero()[:, 0].tolist()
    assert len(kept) == attn_heads and kept == sorted(w.abs().flatten().topk(attn_heads).indices.tolist())
    assert torch.equal(matrix.flatten()[kept], w.flatten()[kept])
    assert rr.read_layers() == [0]
    full = reranker(lm, mode="attn", attn_weights=as_tuple)
    feats = full.attention_features(QUERY, full.passage_kv(PASSAGES)[0])
    expected = torch.einsum("lh,lhk->k", matrix, feats).tolist()
    rr.passage_kv(PASSAGES)
    rr.engine.prefix_kv(rr.prefix_ids)
    with CallCounter(lm.model.model.layers[1]) as second:
        scores = rr.score(QUERY, PASSAGES)
    assert second.calls == 0  # the pass stopped after layer 0, the only layer read
    assert max(abs(a - b) for a, b in zip(scores, expected)) <= 1e-5


def test_sqa_heads_across_layers_read_both_and_match_the_masked_full_pass(llama):
    gen = torch.Generator().manual_seed(9)
    w = attn_weights_with_top(4, 2, gen)
    w[1, 3] = 5.0  # the largest weight sits in layer 1
    as_tuple = tuple(tuple(r) for r in w.tolist())
    rr = reranker(llama, mode="attn", attn_weights=as_tuple, attn_heads=3)
    assert rr.read_layers() == [0, 1]
    matrix = rr.attn_weight_matrix((2, 4))
    assert (matrix != 0).sum() == 3 and matrix[1, 3] == 5.0 and matrix[0, 0] == 2.0 and matrix[0, 1] == -1.9
    full = reranker(llama, mode="attn", attn_weights=as_tuple)
    expected = torch.einsum("lh,lhk->k", matrix, full.attention_features(QUERY, full.passage_kv(PASSAGES)[0]))
    assert rr.score(QUERY, PASSAGES) == pytest.approx(expected.tolist(), abs=1e-5)


def test_sqa_with_uniform_weights_and_with_more_heads_than_exist(llama):
    rr = reranker(llama, mode="attn", attn_weights=None, attn_heads=2)
    assert int((rr.attn_weight_matrix((2, 4)) != 0).sum()) == 2
    every = reranker(llama, mode="attn", attn_weights=None, attn_heads=99)
    assert every.read_layers() == [0, 1] and torch.equal(every.attn_weight_matrix((2, 4)), torch.full((2, 4), 1 / 8))
    assert every.score(QUERY, PASSAGES) == reranker(llama, mode="attn", attn_weights=None).score(QUERY, PASSAGES)
    with pytest.raises(KvrankError, match="attn_heads must be >= 1.*got 0"):
        RerankerConfig(kv_format="none", mode="attn", attn_heads=0)


# ---------------------------------------------------------------------------------------------- 9. store
@pytest.mark.parametrize("name", ["int8", "int4", "rank8+int4", "heads1+int8"])
def test_disk_store_round_trips_compressed_entries_with_scales_bit_exactly(tmp_path: Path, name: str):
    gen = torch.Generator().manual_seed(2)
    _, keys, values, rope, _ = synthetic_blocks(gen, lengths=(13, 21, 30))
    codec = codec_for(name, keys, values, rope, START, HKV, D)
    tag = f"dtype=float16;compute=float32;format={name}"
    store = DiskKVStore(tmp_path / "s", StoreIdentity("model-x", tag), StoreConfig(fsync=False))
    entries = []
    for i, (k, v) in enumerate(zip(keys, values)):
        ck, cv, aux = codec.encode(k, v, START)
        assert aux and all(x.dtype == torch.float16 for x in aux.values())
        entries.append(PassageKV(kv_key("model-x", [1], [i], tag), ck, cv, aux))
        store.put(entries[-1])
    reopened = DiskKVStore(tmp_path / "s")
    got = reopened.get_many([e.key for e in entries])
    for want, have in zip(entries, got):
        assert have is not None and sorted(have.aux) == sorted(want.aux)
        for a, b in zip(want.keys + want.values + [want.aux[n] for n in sorted(want.aux)],
                        have.keys + have.values + [have.aux[n] for n in sorted(want.aux)]):
            assert a.dtype == b.dtype and torch.equal(a, b)
        decoded = [codec.decode(have.keys[i], have.values[i], have.aux, i, START, torch.float32) for i in range(2)]
        original = [codec.decode(want.keys[i], want.values[i], want.aux, i, START, torch.float32) for i in range(2)]
        assert all(torch.equal(x, y) for d, o in zip(decoded, original) for x, y in zip(d, o))
    assert reopened.verify().ok == len(entries)


def settings(checkpoint: Path, kv_format: str, **kw) -> RerankerConfig:
    return RerankerConfig(model=str(checkpoint), kv_format=kv_format, template=TEMPLATE, batch_size=4, **kw)


NO_FSYNC = StoreConfig(fsync=False)


def reranker_with_store(config: RerankerConfig, store: Path, store_config: StoreConfig = NO_FSYNC,
                        calibration: list[Passage] = ()) -> BlockReranker:
    """What `kvrank warm` and `kvrank eval --store` build (`build_reranker`): the store opened with the reranker's
    identity; a fitted format's basis from the store, else fitted on (a sample of) the `calibration` corpus."""
    config = PipelineConfig(reranker=config, kv_format=config.kv_format, store_dir=store, store_config=store_config,
                            calibration_passages=max(len(calibration), 1))
    return build_reranker(config, list(calibration))


def test_a_store_of_one_format_refuses_another_before_fitting(tmp_path: Path, tiny_checkpoint: Path):
    store = tmp_path / "store"
    warm(reranker_with_store(settings(tiny_checkpoint, "int8"), store, NO_FSYNC), CALIBRATION)
    with pytest.raises(KvrankError) as err:
        reranker_with_store(settings(tiny_checkpoint, "rank8+int8"), store, NO_FSYNC, calibration=CALIBRATION)
    assert "'int8'" in str(err.value) and "'rank8+int8'" in str(err.value) and "kv_format='int8'" in str(err.value)
    assert err.value.param == "kv_format"
    assert not (store / BASIS_FILE).exists()  # refused before fitting: nothing was fitted or saved
    with pytest.raises(KvrankError, match="'int8'.*'none'"):
        reranker_with_store(settings(tiny_checkpoint, "none"), store, NO_FSYNC)
    same = reranker_with_store(settings(tiny_checkpoint, "int8"), store, NO_FSYNC)
    same.score(QUERY, CALIBRATION[:3])
    assert same.prefills == 0


def test_the_fitted_basis_lives_in_the_store_and_is_reused_without_refitting(tmp_path: Path,
                                                                             tiny_checkpoint: Path):
    store = tmp_path / "store"
    config = settings(tiny_checkpoint, "rank8+int8")
    with pytest.raises(KvrankError, match=r"^kv_format 'rank8\+int8' is fitted on") as err:
        reranker_with_store(config, tmp_path / "empty", NO_FSYNC)  # nothing to fit on, nothing stored
    assert err.value.param == "kv_format"
    first = reranker_with_store(config, store, NO_FSYNC, calibration=CALIBRATION)
    assert (store / BASIS_FILE).is_file()
    saved, fitted_for = load_basis(store)
    assert fitted_for == "rank8+int8" and saved.keys() == first.engine.codec.basis.keys()
    assert all(torch.equal(saved[n], first.engine.codec.basis[n]) for n in saved)
    assert first.storage_tag == f"dtype=float16;compute=float32;format=rank8+int8;basis={basis_digest(saved)}"
    warmed = first.score(QUERY, PASSAGES)
    second = reranker_with_store(config, store, NO_FSYNC)  # no calibration: it would fail if it had to refit
    assert second.storage_tag == first.storage_tag
    assert second.score(QUERY, PASSAGES) == warmed and second.prefills == 0


def test_storage_tag_depends_on_the_calibration_set(llama):
    config = RerankerConfig(kv_format="rank8", template=TEMPLATE)
    a, a_again, b = (fit_format_basis(config, llama, passages)
                     for passages in (CALIBRATION[:6], CALIBRATION[:6], CALIBRATION[4:]))
    tag = [storage_tag("float16", "float32", config.format, x) for x in (a, a_again, b)]
    assert tag[0] == tag[1] and tag[0] != tag[2]
    ids = reranker(llama, basis=a, kv_format="rank8").block_ids(PASSAGES[0])
    fp = BlockEngine(llama).fingerprint
    assert kv_key(fp, [], ids, tag[0]) != kv_key(fp, [], ids, tag[2])  # entries of the two bases never meet
    with pytest.raises(KvrankError, match="needs a fitted basis"):
        storage_tag("float16", "float32", config.format, None)


def test_a_basis_file_of_another_format_is_not_used(tmp_path: Path, tiny_checkpoint: Path, llama):
    """A folder can hold basis.safetensors without a manifest (fitted and saved, then the store was never created:
    a crash, or a format the model then refused). Another format must not pick that basis up: rank4 would then
    store 8-wide latents under the name rank4."""
    store = tmp_path / "store"
    rank8 = settings(tiny_checkpoint, "rank8")
    save_basis(store, KVFormat.parse("rank8"), fit_format_basis(rank8, llama, CALIBRATION))
    rr = reranker_with_store(settings(tiny_checkpoint, "rank4"), store, NO_FSYNC, calibration=CALIBRATION)
    kv = rr.passage_kv(PASSAGES[:1])[0][0]
    assert tuple(kv.keys[0].shape)[-1] == 4, f"format rank4 stored {tuple(kv.keys[0].shape)} latents"


def test_a_refused_format_leaves_no_basis_behind(tmp_path: Path, tiny_checkpoint: Path):
    """rank40 exceeds the tiny model's 32 KV dims: refused, and the folder must stay free of a basis that a later
    open of the folder would pick up."""
    store = tmp_path / "store"
    with pytest.raises(KvrankError, match="rank40"):
        reranker_with_store(settings(tiny_checkpoint, "rank40"), store, NO_FSYNC, calibration=CALIBRATION)
    assert not (store / BASIS_FILE).exists()


def test_served_variants_of_a_fitted_reranker_keep_its_basis(llama):
    """The API derives rerankers for other modes and token budgets from the base one
    (`SearchPipeline.reranker_for`); with a fitted format they need the base's basis (and then share its storage
    tag and store)."""
    base = fitted_reranker(llama, mode="ql", kv_format="rank16+int8")
    config = PipelineConfig(retriever=None, candidates=Path("none.trec"), reranker=base.config)
    pipeline = SearchPipeline(config, {p.doc_id: p for p in PASSAGES}, CandidatesRetriever({}, "none"), base)
    assert pipeline.reranker_for("ql") is base
    for mode, tokens in (("attn", None), ("ql", 16)):
        variant = pipeline.reranker_for(mode, tokens)
        assert variant is not base and pipeline.reranker_for(mode, tokens) is variant  # kept, not rebuilt
        assert variant.storage_tag == base.storage_tag and variant.store is base.store
        assert variant.engine.codec.basis is base.engine.codec.basis
        assert len(variant.score(QUERY, PASSAGES)) == len(PASSAGES)


# ---------------------------------------------------------------------------------------------- 10. CLI
def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_cli_warm_stats_and_eval_with_a_kv_format(tmp_path: Path, tiny_beir: Path, tiny_checkpoint: Path):
    store = tmp_path / "store"
    common = ["--data", str(tiny_beir), "--model", str(tiny_checkpoint), "--store", str(store)]
    warmed = invoke("warm", *common, "--kv-format", "int8+rank8", "--calibration-passages", "6")
    assert warmed.exit_code == 0, warmed.output
    assert "kv format rank8+int8" in warmed.output
    stats = invoke("store", "stats", "--store", str(store), "--json")
    assert stats.exit_code == 0, stats.output
    report = json.loads(stats.output)
    assert report["kv_format"] == "rank8+int8" and report["entries"] == 8
    assert report["identity"]["storage_tag"].startswith("dtype=float16;compute=float32;format=rank8+int8;basis=")
    assert (store / BASIS_FILE).is_file()

    evaluate = ["eval", "--data", str(tiny_beir), "--retriever", "bm25", "--rerank", "ql", "--rerank-depth", "3",
                "--model", str(tiny_checkpoint), "--store", str(store)]
    refused = invoke(*evaluate, "--kv-format", "int8")
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    (line,) = error_lines(refused.output)
    assert "'rank8+int8'" in line and "'int8'" in line

    ok = invoke(*evaluate, "--kv-format", "rank8+int8", "--json", str(tmp_path / "run.json"))
    assert ok.exit_code == 0, ok.output
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["prefills"] == 0 and run["kv_cache"]["hits"] > 0 and run["reranker"]["kv_format"] == "rank8+int8"


def test_cli_refuses_bad_kv_format_names(tmp_path: Path, tiny_beir: Path, tiny_checkpoint: Path):
    for args in (["warm", "--data", str(tiny_beir), "--store", str(tmp_path / "s"), "--model", str(tiny_checkpoint),
                  "--kv-format", "int3"],
                 ["eval", "--data", str(tiny_beir), "--retriever", "bm25", "--rerank", "ql", "--model",
                  str(tiny_checkpoint), "--kv-format", "int3"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        (line,) = error_lines(result.output)
        assert line.startswith("error: --kv-format 'int3': cannot read 'int3'") and GRAMMAR in line
    assert not (tmp_path / "s").exists()


def test_auto_is_the_models_recommendation_and_int8_for_unmeasured_models(llama):
    assert recommended_format("not-a-measured-model") == FALLBACK_FORMAT == "int8"
    assert all(KVFormat.parse(name).name == name for name in RECOMMENDED.values())
    rr = BlockReranker(RerankerConfig(kv_format="auto", template=TEMPLATE), lm=llama)
    assert rr.config.kv_format == "int8" and rr.storage_tag.endswith(";format=int8")
    with pytest.raises(KvrankError, match="auto"):
        KVFormat.parse("auto")  # a placeholder for the config and CLI, never a stored layout


def test_cli_default_is_auto_for_a_new_store_and_the_stores_own_format_after(tmp_path: Path, tiny_beir: Path,
                                                                            tiny_checkpoint: Path):
    store = tmp_path / "store"
    common = ["--data", str(tiny_beir), "--model", str(tiny_checkpoint), "--store", str(store)]
    assert invoke("warm", *common, "--kv-format", "rank8+int4", "--calibration-passages", "6").exit_code == 0
    resumed = invoke("warm", *common)  # no --kv-format: the store's own, nothing to redo
    assert resumed.exit_code == 0 and "kv format rank8+int4" in resumed.output, resumed.output
    fresh = invoke("warm", "--data", str(tiny_beir), "--model", str(tiny_checkpoint), "--store", str(tmp_path / "b"))
    assert fresh.exit_code == 0 and "kv format int8" in fresh.output, fresh.output  # auto, unmeasured model


def test_a_calibration_sample_of_a_sample_is_itself():
    """A Ray worker handed the driver's sample fits the same basis as the driver would (same passages, same
    order)."""
    from kvrank.store.formats import calibration_sample
    from kvrank.types import Passage

    corpus = [Passage(f"d{i}", "", f"text {i}") for i in range(200)]
    sample = calibration_sample(corpus, 64)
    assert len(sample) == 64 and calibration_sample(sample, 64) == sample
    assert calibration_sample(corpus[:10], 64) == sorted(corpus[:10], key=lambda p: p.doc_id)
