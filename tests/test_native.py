"""The fused CPU kernel of the `attn` pass (kvrank/attention/blockmass.c) against the eager reference.

It runs wherever the CPU has AVX2 and a C compiler is installed (the CI machine has both); elsewhere these tests
skip and the pass keeps the ATen chunk loop, which test_attention.py covers.
"""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch
from conftest_models import tiny_lm

from kvrank.attention import functional, native
from kvrank.attention.functional import block_attention, segment_mass
from kvrank.attention.quantize import dequantize, quantize
from kvrank.flops import count_flops
from kvrank.reranker.blocks import StreamedBlocks
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.store.kv import MemoryKVStore
from kvrank.types import Passage

needs_kernel = pytest.mark.skipif(not native.available(), reason="native kernel not built here (no AVX2 or no cc)")
CAN_BUILD = sys.platform == "linux" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def test_the_kernel_builds_wherever_it_can():
    """On Linux x86 with AVX2 and a C compiler the kernel must build and load: a source the compiler refuses fails
    here instead of turning every kernel test into a skip."""
    if not CAN_BUILD or native._compiler() is None or os.environ.get(native.ENABLE) == "0":
        pytest.skip("no x86 CPU with AVX2, or no C compiler, or the kernel switched off")
    assert native.available()


def eager_blocks(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]):
    """Softmax over all blocks' keys in float64: output, per-block mass, and the log2 row maximum."""
    k, v = torch.cat(keys, 1).double(), torch.cat(values, 1).double()
    scores = q.double() @ k.transpose(1, 2)  # (Hkv, R, T), log2 units
    top = scores.amax(-1, keepdim=True)
    p = torch.exp2(scores - top)
    seg = torch.repeat_interleave(torch.arange(len(keys)), torch.tensor([x.shape[1] for x in keys]))
    sums = torch.zeros(*p.shape[:2], len(keys), dtype=torch.float64).index_add_(-1, seg, p)
    return p @ v, sums, top


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_block_mass_equals_the_eager_softmax(dtype):
    """Rows not a multiple of 16, blocks of 1 to 200 keys, and a late block scoring far above the rest (~120 log2
    units: the running maximum grows, the output and earlier blocks are rescaled)."""
    torch.manual_seed(0)
    hkv, rows, d = 3, 21, 16
    lengths = [200, 37, 1, 150, 9, 64]
    q = torch.randn(hkv, rows, d)
    keys = [torch.randn(hkv, n, d).to(dtype) for n in lengths]
    values = [torch.randn(hkv, n, d).to(dtype) for n in lengths]
    keys[4] = (q.mean(1, keepdim=True) * 120 / q.mean(1).norm(dim=-1).pow(2)[:, None, None]).expand(hkv, 9, d) \
        .to(dtype).contiguous()
    out, sums, ref = native.block_mass(q, keys, values, [], [], 1)
    for threads in (2, 5):  # each head's blocks split into parts of about equal tokens, one softmax each, joined
        for a, b in zip((out, sums, ref), native.block_mass(q, keys, values, [], [], threads)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
    e_out, e_sums, e_top = eager_blocks(q, keys, values)
    assert float(e_top.max()) > 100  # the regime the test is about
    assert torch.allclose(ref.double(), e_top, atol=1e-3)
    scale = torch.exp2(ref.double() - e_top)  # the kernel's reference against the eager one (equal up to rounding)
    norm = e_sums.sum(-1, keepdim=True)
    # scores near 120 carry fp32 rounding of ~1e-5 into their exponentials (the chunk loop's too)
    assert (out.double() / scale / norm - e_out / norm).abs().max() <= 1e-4 * (e_out / norm).abs().max()
    assert (sums.double() / scale / norm - e_sums / norm).abs().max() <= 1e-4


@needs_kernel
@pytest.mark.parametrize("lengths,rows,d", [([3, 500], 9, 8), ([500, 2, 1], 9, 8), ([7, 1], 1, 256),
                                            ([40, 13, 200], 3, 64)])
def test_block_mass_splits_uneven_blocks_over_more_threads_than_fit(lengths, rows, d):
    """Parts are cut by tokens: one long block leaves the other parts empty, and a part that saw nothing joins with
    weight 0. Also one query row and Gemma-3's head_dim of 256, against float64."""
    torch.manual_seed(1)
    q = torch.randn(2, rows, d) / d ** 0.25
    keys = [torch.randn(2, n, d).half() for n in lengths]
    values = [torch.randn(2, n, d).half() for n in lengths]
    one = native.block_mass(q, keys, values, [], [], 1)
    e_out, e_sums, e_top = eager_blocks(q, keys, values)
    norm = e_sums.sum(-1, keepdim=True)
    scale = torch.exp2(one[2].double() - e_top) * norm
    assert torch.allclose(one[0].double() / scale, e_out / norm, atol=1e-5)
    assert torch.allclose(one[1].double() / scale, e_sums / norm, atol=1e-6)
    for threads in (2, 4):
        for a, b in zip(one, native.block_mass(q, keys, values, [], [], threads)):
            assert torch.isfinite(b).all() and torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()))


def test_block_mass_refuses_blocks_whose_rows_are_not_contiguous():
    q, k = torch.randn(1, 5, 8), torch.randn(1, 1, 8).expand(1, 4, 8)  # every row the same memory
    with pytest.raises(ValueError, match="contiguous rows"):
        native.block_mass(q, [k], [k], [], [], 1)


@needs_kernel
def test_block_mass_counts_the_flops_of_its_two_matmuls():
    q, keys = torch.randn(2, 5, 8), [torch.randn(2, 7, 8), torch.randn(2, 3, 8)]
    _, flops, per_op = count_flops(lambda: native.block_mass(q, keys, keys, [], [], 1))
    assert flops == per_op["kvrank.block_mass"] == 2 * (2 * 2 * 5 * 10 * 8)


class _Blocks:
    """Stored slots as the block engine hands them out: chunk by chunk (`kv`, in the model's dtype) or block by block
    (`blocks`, as stored: `dtype`)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, start: int, lengths: list[int], dtype: torch.dtype):
        self.k, self.v, self.start, self.length, self.lengths, self.dtype = k, v, start, sum(lengths), lengths, dtype
        self.calls = 0

    def kv(self, a: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:  # decoded to the model's dtype
        return self.k[:, :, a:z], self.v[:, :, a:z]

    def blocks(self) -> list[functional.StoredBlock]:
        self.calls += 1
        k = self.k[0, :, self.start:self.start + self.length].to(self.dtype).split(self.lengths, dim=1)
        v = self.v[0, :, self.start:self.start + self.length].to(self.dtype).split(self.lengths, dim=1)
        return [functional.StoredBlock(*kv) for kv in zip(k, v)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_chunked_mass_attention_with_the_kernel_equals_eager_and_the_chunk_loop(monkeypatch, dtype):
    """Prefix, stored blocks (through the kernel) and two causal query segments (through the chunk loop), joined:
    output and per-segment mass equal the eager reference and the pass without the kernel."""
    torch.manual_seed(3)
    lengths = [120, 1, 300, 47]
    seg = torch.tensor([[0] * 3 + sum(([i + 1] * n for i, n in enumerate(lengths)), []) + [5] * 4 + [6] * 3])
    tk, tq, start = seg.shape[1], 7, 3
    q = torch.randn(1, 6, tq, 16) * 2
    k, v = torch.randn(1, 2, tk, 16).to(dtype).float(), torch.randn(1, 2, tk, 16).to(dtype).float()
    mask = torch.zeros(1, 1, tq, tk)
    mask[..., -tq:] = torch.triu(torch.full((tq, tq), float("-inf")), 1)
    out, probs = block_attention(q, k, v, mask, 0.3)
    ref = segment_mass(probs, seg, 7)
    keep = torch.cat([torch.arange(start), torch.arange(start + sum(lengths), tk)])
    results = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(native, "available", lambda: False)
        stored = _Blocks(k, v, start, lengths, dtype)
        result, _, per_op = count_flops(lambda stored=stored: functional.chunked_mass_attention(
            q, k[:, :, keep], v[:, :, keep], mask, 0.3, seg, 7, stored=stored, plans={}))
        results.append(result)
        assert stored.calls == int(kernel) and ("kvrank.block_mass" in per_op) == kernel
    for fast_out, fast_mass in results:
        assert torch.allclose(fast_out, out, atol=1e-5) and torch.allclose(fast_mass, ref, atol=1e-6)


def test_without_a_compiler_the_kernel_is_unavailable_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            assert not native.available()
        if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            assert "no C compiler found" in caplog.text
        monkeypatch.setenv(native.ENABLE, "0")
        native._library.cache_clear()

        def looked_up() -> str:
            raise AssertionError("a compiler was looked up with KVRANK_NATIVE=0")

        monkeypatch.setattr(native, "_compiler", looked_up)
        assert not native.available()  # switched off: not even tried
    finally:
        native._library.cache_clear()


def test_loaded_says_what_the_process_used_without_compiling(monkeypatch):
    from kvrank.eval.runner import machine_info

    def no_lookup() -> str:
        raise AssertionError("loaded() looked up a compiler")

    native._library.cache_clear()
    try:
        monkeypatch.setattr(native, "_compiler", no_lookup)
        assert native.loaded() is None and machine_info()["native_attn_kernel"] is None  # nothing asked for it yet
        monkeypatch.setenv(native.ENABLE, "0")
        assert not native.available()
        assert native.loaded() is False and machine_info()["native_attn_kernel"] is False
    finally:
        native._library.cache_clear()
    if native.available():
        assert native.loaded() is True


def test_a_failing_compiler_is_reported_not_raised(monkeypatch, caplog, tmp_path):
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the build is tried only on x86 CPUs with AVX2")
    monkeypatch.setenv("KVRANK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    native._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            assert not native.available()
        assert "/bin/false failed on blockmass.c" in caplog.text
        assert not list((tmp_path / "native").glob("*.so"))  # nothing half-built left where a later load would find it
    finally:
        native._library.cache_clear()


@pytest.mark.parametrize("kernel", [True, False])
def test_a_row_that_sees_only_stored_keys_far_below_zero_stays_finite(monkeypatch, kernel):
    """A query row masked from every non-stored key, whose stored scores all lie near -200 (log2 units): joining
    the kernel's softmax with the loop's (which saw nothing for that row) and the loop's own running maximum must
    weigh the empty part 0, not 2^200 x 0."""
    if kernel and not native.available():
        pytest.skip("native kernel not built here")
    if not kernel:
        monkeypatch.setattr(native, "available", lambda: False)
    torch.manual_seed(4)
    lengths, tq = [120, 1, 300], 5
    seg = torch.tensor([[0] * 2 + sum(([i + 1] * n for i, n in enumerate(lengths)), []) + [4] * tq])
    tk, start = seg.shape[1], 2
    mask = torch.zeros(1, 1, tq, tk)
    mask[..., -tq:] = torch.triu(torch.full((tq, tq), float("-inf")), 1)
    mask[..., 0, :start] = float("-inf")
    mask[..., 0, -tq:] = float("-inf")  # row 0 sees the stored blocks only
    q = torch.ones(1, 6, tq, 16)
    k, v = torch.randn(1, 2, tk, 16), torch.randn(1, 2, tk, 16)
    k[:, :, start:start + sum(lengths)] = -30 + 0.01 * torch.randn(1, 2, sum(lengths), 16)  # ~ -208 log2 units
    out, probs = block_attention(q, k, v, mask, 0.3)
    keep = torch.cat([torch.arange(start), torch.arange(start + sum(lengths), tk)])
    fast_out, fast_mass = functional.chunked_mass_attention(q, k[:, :, keep], v[:, :, keep], mask, 0.3, seg, 5,
                                                            stored=_Blocks(k, v, start, lengths, torch.float32),
                                                            plans={})
    assert torch.isfinite(fast_out).all() and torch.isfinite(fast_mass).all()
    assert torch.allclose(fast_out, out, atol=1e-5) and torch.allclose(fast_mass, segment_mass(probs, seg, 5),
                                                                       atol=1e-6)


@needs_kernel
def test_block_mass_reads_int8_codes_with_their_scales():
    """kvrank's int8 format (per-channel key scales, per-token value scales, fp16) decoded inside the kernel equals
    the softmax over the dequantised blocks."""
    torch.manual_seed(5)
    hkv, rows, d = 2, 11, 64
    lengths = [30, 1, 77]
    q = torch.randn(hkv, rows, d) / 4
    coded = [(quantize(torch.randn(hkv, n, d), axis=1, bits=8), quantize(torch.randn(hkv, n, d), axis=2, bits=8))
             for n in lengths]
    keys, key_scales = [k for (k, _), _ in coded], [s for (_, s), _ in coded]
    values, value_scales = [v for _, (v, _) in coded], [s for _, (_, s) in coded]
    out, sums, ref = native.block_mass(q, keys, values, key_scales, value_scales, 1)
    e_out, e_sums, e_top = eager_blocks(q, [dequantize(k, s) for k, s in zip(keys, key_scales)],
                                        [dequantize(v, s) for v, s in zip(values, value_scales)])
    norm = e_sums.sum(-1, keepdim=True)
    scale = torch.exp2(ref.double() - e_top) * norm
    assert torch.allclose(out.double() / scale, e_out / norm, atol=1e-5)
    assert torch.allclose(sums.double() / scale, e_sums / norm, atol=1e-6)
    assert not native.supports(q, keys, values)  # int8 without its scales is refused


@needs_kernel
@pytest.mark.parametrize("kv_format,stored", [("none", torch.float16), ("int8", torch.int8),
                                              ("int4", torch.float32)])
def test_attn_scores_through_the_kernel_equal_the_loop_for_each_format(monkeypatch, kv_format, stored):
    """The `attn` pass of a tiny Llama over fp16, int8 (decoded in the kernel) and int4 (decoded first) stores: the
    kernel runs, on the blocks as the format keeps them, and the scores equal those of the ATen loop."""
    lm = tiny_lm("llama")
    passages = [Passage(f"d{i}", "", text) for i, text in enumerate(
        ("The cat sat on the warm mat.", "Paris is the capital of France and a city", "Plants turn light to sugar"))]
    rr = BlockReranker(RerankerConfig(mode="attn", kv_format=kv_format), store=MemoryKVStore(), lm=lm)
    rr.passage_kv(passages)
    seen: list[torch.dtype] = []
    real = StreamedBlocks.blocks
    monkeypatch.setattr(StreamedBlocks, "blocks", lambda self: [seen.append(b.keys.dtype) or b for b in real(self)])
    kernel, _, per_op = count_flops(lambda: rr.score("capital of France?", passages))
    assert "kvrank.block_mass" in per_op and set(seen) == {stored}
    monkeypatch.setattr(native, "available", lambda: False)
    loop = rr.score("capital of France?", passages)
    assert max(abs(a - b) for a, b in zip(kernel, loop)) <= 1e-6
