"""One row per (query, passage): the layout of the modes that read the model's output after one block (`ql`,
`yesno`). Row = [prefix][the passage's stored block][the query part]; `batch_size` rows per forward, filled across
queries, new tokens right-padded (a token never attends to the padding after it, so a row's score does not depend
on the rows beside it). Only the logits a mode reads are computed (`RowReadout.window`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from kvrank.store.kv import PassageKV

if TYPE_CHECKING:
    from kvrank.reranker.reranker import BlockReranker

QuerySpan = tuple[list[int], int, int]  # the query part's ids and the [start, end) of the query's own tokens


class RowReadout(Protocol):
    """What a mode reads from the logits of its rows."""

    def window(self, span: QuerySpan) -> tuple[int, int]:
        """[lo, hi): the positions of the query part whose logits the score reads."""
        ...

    def read(self, logits: torch.Tensor, spans: Sequence[QuerySpan], lo: int) -> list[torch.Tensor]:
        """One score per row from a batch's logits (B, hi - lo, V), position `lo` first."""
        ...


def row_scores(rr: BlockReranker, queries: Sequence[str], blocks: Sequence[Sequence[PassageKV]],
               readout: RowReadout, grad: bool = False) -> list[torch.Tensor]:
    """Each query's scores over its own blocks, a (K,) tensor per query. `grad=True` keeps the graph through the
    query-side pass (training a query-side adapter)."""
    spans = [rr.query_ids(q) for q in queries]
    windows = [readout.window(span) for span in spans]
    device = rr.lm.device
    rows = [(qi, bi) for qi, row in enumerate(blocks) for bi in range(len(row))]
    out: list[list[torch.Tensor]] = [[] for _ in blocks]
    size = rr.config.batch_size
    for chunk in (rows[i:i + size] for i in range(0, len(rows), size)):
        lo = min(windows[qi][0] for qi, _ in chunk)
        hi = max(windows[qi][1] for qi, _ in chunk)
        logits, _ = rr.engine.run(rr.prefix_ids, [[blocks[qi][bi]] for qi, bi in chunk],
                                  [spans[qi][0] for qi, _ in chunk],
                                  logits_to_keep=torch.arange(lo, hi, device=device), grad=grad)
        assert logits is not None  # these modes read every layer (check_format)
        with torch.set_grad_enabled(grad):
            scores = readout.read(logits, [spans[qi] for qi, _ in chunk], lo)
        for (qi, _), score in zip(chunk, scores):
            out[qi].append(score)
    return [torch.stack(row) if row else torch.zeros(0, device=device) for row in out]
