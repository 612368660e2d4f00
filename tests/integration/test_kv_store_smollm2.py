"""Integration tier: the disk KV store with the real SmolLM2 model on SciFact passages (skips without the data)."""

from __future__ import annotations

from pathlib import Path

import pytest
from shared_data import SCIFACT

from kvrank.attention.kvformat import KVFormat
from kvrank.errors import KvrankError
from kvrank.eval.data import load_dataset
from kvrank.pipeline import PipelineConfig, build_reranker
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.store.disk import DiskKVStore, StoreIdentity
from kvrank.store.formats import storage_tag
from kvrank.store.kv import MemoryKVStore
from kvrank.store.warm import warm

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").is_file(), reason=f"no SciFact at {SCIFACT}"),
]


def test_warmed_store_serves_smollm2_kv_with_scores_identical_to_fresh(tmp_path: Path) -> None:
    dataset = load_dataset(SCIFACT)
    passages = list(dataset.corpus.values())[:6]
    query = next(iter(dataset.queries.values())).text
    settings = RerankerConfig(kv_format="none", mode="ql", batch_size=3)
    # The uncompressed fp16 layout, as `kvrank warm --kv-format none` builds it: 30 layers x 3 KV heads x 64 x
    # (K, V) x 2 bytes per token plus the entry header.
    config = PipelineConfig(reranker=settings, kv_format="none", store_dir=tmp_path / "store")
    writer = build_reranker(config, passages)
    result = warm(writer, passages)
    assert result.prefilled == 6 and writer.store.totals()["bytes_per_token"] == pytest.approx(23040, rel=0.01)
    writer.store.close()

    reader = build_reranker(PipelineConfig(reranker=settings, store_dir=tmp_path / "store"), passages)  # `eval --store`
    assert reader.config.kv_format == "none"  # no --kv-format: the store's own
    fresh = BlockReranker(settings, store=MemoryKVStore(), lm=reader.lm)
    assert reader.score(query, passages) == fresh.score(query, passages)
    assert reader.prefills == 0 and reader.store.stats().hits == 6

    fp32 = storage_tag("float32", "float32", KVFormat(), None)
    with pytest.raises(KvrankError, match="storage_tag"):  # fp32 KV of the same model: refused
        DiskKVStore(tmp_path / "store", StoreIdentity(reader.engine.fingerprint, fp32))
