"""A first stage read from a TREC run file (e.g. TREC DL's official BM25 top-100 pools): `CandidatesRetriever`
answers each query with its run's ranking, so a rerank pool goes through the same pipeline as a live retriever."""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator
from pathlib import Path

from ir_measures import read_trec_run

from kvrank.errors import KvrankError
from kvrank.types import Dataset, Query, Run

logger = logging.getLogger(__name__)

RUN_LINE = "'qid Q0 docid rank score tag'"


def read_run(path: str | Path) -> Run:
    """A TREC run file (`qid Q0 docid rank score tag` per line; `.gz` too) as query_id -> ScoredDocs, best first.

    Parsed by ir_measures' reader. Order follows the scores (as trec_eval and ir_measures read them), file order
    breaking ties. A malformed line or a document listed twice for a query is an error naming the line.
    """
    run_path = Path(path).expanduser()
    if not run_path.is_file():
        raise KvrankError(f"candidates {path}: no such run file", param="candidates")
    run: Run = {}
    seen: set[tuple[str, str]] = set()
    try:
        for n, doc in enumerate(read_trec_run(str(run_path))):
            if (doc.query_id, doc.doc_id) in seen:
                raise KvrankError(f"{run_path}:{_line_of(run_path, n)}: doc {doc.doc_id!r} appears twice for query "
                                  f"{doc.query_id!r}; a run lists each document once per query")
            seen.add((doc.query_id, doc.doc_id))
            run.setdefault(doc.query_id, []).append(doc)
    except (ValueError, UnicodeDecodeError, gzip.BadGzipFile):
        raise KvrankError(_first_bad_line(run_path)) from None
    if not run:
        raise KvrankError(f"{run_path} is empty; a run file needs at least one {RUN_LINE} line")
    for docs in run.values():
        docs.sort(key=lambda d: -d.score)
    return run


class CandidatesRetriever:
    """The `Retriever` over a fixed run: `search` returns each query's candidates (an unknown query gets none)."""

    kind = "run"
    precomputed = True  # no retrieval work to time

    def __init__(self, run: Run, name: str):
        self.run = run
        self.name = name

    @classmethod
    def from_file(cls, path: str | Path, dataset: Dataset | None = None) -> CandidatesRetriever:
        run = read_run(path)
        if dataset is not None:
            check_candidates(run, list(dataset.queries.values()), dataset)
        return cls(run, f"candidates:{Path(path).name}")

    def search(self, queries: list[Query], k: int) -> Run:
        return {q.query_id: list(self.run.get(q.query_id, []))[:k] for q in queries}


def check_candidates(run: Run, queries: list[Query], dataset: Dataset) -> None:
    """Refuse a run that answers none of the queries; warn about missing queries and unknown documents."""
    missing = [q.query_id for q in queries if q.query_id not in run]
    if len(missing) == len(queries):
        raise KvrankError(f"the candidates run names none of the {len(queries)} test queries of "
                          f"{dataset.source or dataset.name} (e.g. {missing[:3]}); is it a run for this dataset?")
    if missing:
        logger.warning("the candidates run has no results for %d of %d test queries (e.g. %s); they score 0",
                       len(missing), len(queries), missing[:3])
    unknown = {d.doc_id for q in queries for d in run.get(q.query_id, [])} - dataset.corpus.keys()
    if unknown:
        logger.warning("the candidates run names %d doc ids not in the corpus (e.g. %s); they are evaluated but "
                       "never reranked", len(unknown), sorted(unknown)[:3])


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        yield from enumerate(handle, start=1)


def _line_of(path: Path, record: int) -> int:
    """The line number of the `record`-th non-blank line (0-based), for error messages."""
    seen = -1
    for line_no, line in _lines(path):
        seen += bool(line.strip())
        if seen == record:
            return line_no
    return 0


def _first_bad_line(path: Path) -> str:
    try:
        for line_no, line in _lines(path):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                return (f"{path}:{line_no}: expected {RUN_LINE} (6 fields), got {len(fields)}: "
                        f"{line.strip()[:80]!r}")
            try:
                float(fields[4])
            except ValueError:
                return f"{path}:{line_no}: score {fields[4]!r} is not a number"
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as err:
        return f"{path}: not a text TREC run file ({err}); expected {RUN_LINE} lines"
    return f"{path}: not a TREC run file; expected {RUN_LINE} lines"
