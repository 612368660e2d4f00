"""Load test collections from BEIR-layout folders or ir_datasets ids, with errors that name the fix.

A BEIR folder holds `corpus.jsonl` ({"_id", "title", "text"}), `queries.jsonl` ({"_id", "text"}) and
`qrels/test.tsv` (header `query-id<TAB>corpus-id<TAB>score`). Only queries that appear in the qrels are test
queries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from kvrank.errors import KvrankError
from kvrank.retriever.candidates import read_run as read_run  # re-exported: the eval module reads runs too
from kvrank.types import Dataset, Passage, Qrel, Query, ScoredDoc

logger = logging.getLogger(__name__)


def load_dataset(source: str | Path, split: str = "test") -> Dataset:
    """A BEIR folder path, or an ir_datasets id such as `beir/scifact/test` (needs the network once)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return load_beir_folder(path, split)
    if path.exists():
        raise KvrankError(f"source {source!s} is a file; pass the BEIR folder that holds corpus.jsonl", param="source")
    text = str(source)
    if "/" in text and not text.startswith((".", "/", "~")) and not path.parent.exists():
        return load_ir_dataset(text)
    raise KvrankError(
        f"source {source!s}: no such folder. Pass a BEIR folder (corpus.jsonl, queries.jsonl, "
        f"qrels/{split}.tsv) or an ir_datasets id such as beir/scifact/test", param="source"
    )


def load_beir_folder(folder: Path, split: str = "test") -> Dataset:
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for required in (corpus_path, queries_path, qrels_path):
        if not required.is_file():
            raise KvrankError(f"{required} is missing: a BEIR folder needs corpus.jsonl, queries.jsonl and "
                              f"qrels/{split}.tsv")
    corpus = _read_corpus(corpus_path)
    all_queries: dict[str, Query] = {}
    for line_no, row in _read_jsonl(queries_path):
        qid = _required_str(row, "_id", queries_path, line_no)
        all_queries[qid] = Query(qid, _required_str(row, "text", queries_path, line_no))
    qrels = read_qrels_tsv(qrels_path)
    return _assemble(folder.name, corpus, all_queries, qrels, str(folder))


def load_corpus(source: str | Path) -> Dataset:
    """Only the corpus of a BEIR folder (no queries or qrels needed): what label-free tuning reads."""
    folder = Path(source).expanduser()
    corpus_path = folder / "corpus.jsonl"
    if not corpus_path.is_file():
        raise KvrankError(f"source {source}: no corpus.jsonl there; pass a folder holding the corpus as BEIR's "
                          "corpus.jsonl ({\"_id\", \"title\", \"text\"} per line)", param="source")
    return Dataset(name=folder.name, corpus=_read_corpus(corpus_path), queries={}, source=str(folder))


def _read_corpus(corpus_path: Path) -> dict[str, Passage]:
    corpus: dict[str, Passage] = {}
    for line_no, row in _read_jsonl(corpus_path):
        doc_id = _required_str(row, "_id", corpus_path, line_no)
        if doc_id in corpus:
            raise KvrankError(f"{corpus_path}:{line_no}: duplicate doc id {doc_id!r}; "
                              "each _id must be unique")
        corpus[doc_id] = Passage(doc_id, str(row.get("title") or ""), str(row.get("text") or ""))
    if not corpus:
        raise KvrankError(f"{corpus_path} holds no documents; an empty corpus cannot be searched")
    return corpus


def read_qrels_tsv(path: Path) -> list[Qrel]:
    """BEIR qrels (`query-id<TAB>corpus-id<TAB>score`, optional header) or TREC qrels (`qid iter doc rel`)."""
    qrels: list[Qrel] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
            if line_no == 1 and fields[0] == "query-id":
                continue
            if len(fields) == 4:  # TREC qrels: qid iteration docid rel
                fields = [fields[0], fields[2], fields[3]]
            if len(fields) != 3:
                raise KvrankError(f"{path}:{line_no}: expected 'query-id<TAB>corpus-id<TAB>score', "
                                  f"got {fields!r}")
            try:
                relevance = int(float(fields[2]))
            except ValueError:
                raise KvrankError(f"{path}:{line_no}: relevance {fields[2]!r} is not a number") from None
            qrels.append(Qrel(fields[0].strip(), fields[1].strip(), relevance))
    if not qrels:
        raise KvrankError(f"{path} holds no judgements; evaluation needs at least one qrel")
    return qrels


def load_ir_dataset(dataset_id: str) -> Dataset:
    """Load through ir_datasets (downloads on first use; users with internet only)."""
    try:
        import ir_datasets
    except ImportError as err:  # pragma: no cover - a core dependency
        raise KvrankError("ir_datasets is not installed: pip install ir_datasets") from err
    try:
        ds = ir_datasets.load(dataset_id)
    except KeyError:
        raise KvrankError(f"unknown ir_datasets id {dataset_id!r}; see https://ir-datasets.com for ids, "
                          "or pass a BEIR folder") from None
    if not (ds.has_docs() and ds.has_queries() and ds.has_qrels()):
        raise KvrankError(f"ir_datasets id {dataset_id!r} lacks docs, queries or qrels; pick a judged split "
                          "such as beir/scifact/test")
    try:
        corpus = {}
        for doc in ds.docs_iter():
            title = getattr(doc, "title", "") or ""
            text = getattr(doc, "text", None) or getattr(doc, "body", "") or ""
            corpus[doc.doc_id] = Passage(doc.doc_id, title, text)
        queries = {q.query_id: Query(q.query_id, q.text) for q in ds.queries_iter()}
        qrels = [Qrel(q.query_id, q.doc_id, int(q.relevance)) for q in ds.qrels_iter()]
    except Exception as err:  # network or format failures from the hub
        raise KvrankError(f"could not load {dataset_id!r} through ir_datasets ({err}); this needs the "
                          "network on first use, or pass a local BEIR folder") from err
    return _assemble(dataset_id.replace("/", "_"), corpus, queries, qrels, dataset_id)


def write_run(run: dict[str, list[ScoredDoc]], path: str | Path, tag: str = "kvrank") -> None:
    """Write a TREC run file atomically, in each query's list order, scores at full precision."""
    from kvrank.io import atomic_write_text

    lines = []
    for qid in sorted(run):
        for rank, doc in enumerate(run[qid], start=1):
            lines.append(f"{qid} Q0 {doc.doc_id} {rank} {float(doc.score)!r} {tag}\n")
    atomic_write_text(Path(path).expanduser(), "".join(lines))


def _assemble(name: str, corpus: dict[str, Passage], all_queries: dict[str, Query], qrels: list[Qrel],
              source: str) -> Dataset:
    judged = {q.query_id for q in qrels}
    unknown_queries = sorted(judged - all_queries.keys())
    if unknown_queries:
        raise KvrankError(f"{source}: qrels name {len(unknown_queries)} queries missing from queries.jsonl "
                          f"(e.g. {unknown_queries[:3]}); fix the qrels or add the queries")
    unknown_docs = sorted({q.doc_id for q in qrels} - corpus.keys())
    if unknown_docs:
        # A rerank pool (TREC DL) legitimately holds fewer docs than were judged: keep the qrels whole so the
        # ideal DCG is right, and say so.
        logger.warning("%s: qrels name %d doc ids not in the corpus (e.g. %s); they count toward the ideal "
                       "ranking but can never be retrieved", source, len(unknown_docs), unknown_docs[:3])
    queries = {qid: q for qid, q in all_queries.items() if qid in judged}
    extra = {qid: q for qid, q in all_queries.items() if qid not in judged}
    return Dataset(name=name, corpus=corpus, queries=queries, qrels=qrels, extra_queries=extra, source=source)


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise KvrankError(f"{path}:{line_no}: malformed JSON ({err.msg}); each line must be one JSON "
                                  "object") from None
            if not isinstance(row, dict):
                raise KvrankError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def _required_str(row: dict, key: str, path: Path, line_no: int) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip() and key == "_id"):
        raise KvrankError(f"{path}:{line_no}: missing {key!r} field")
    return str(value)
