"""The `attn` mode's features: the attention mass a query puts on each of K blocks, per (layer, head), and the
[layers, heads] weights that combine them into one score per block.

All K blocks sit in one row at the positions `placement` gives them (parallel: the same positions), then the query
once. Shipped weights (fitted by distillation from `ql`) live in `weights/<fingerprint>-<template>.json`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvrank.attention.capture import MassCapture, capture_mass
from kvrank.errors import KvrankError
from kvrank.store.kv import PassageKV

if TYPE_CHECKING:
    from kvrank.reranker.reranker import BlockReranker

WEIGHTS_DIR = Path(__file__).parent / "weights"


def attention_mass(rr: BlockReranker, query: str, blocks: Sequence[PassageKV],
                   grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[L, H, K] block distributions for the query and (with `calibrate`) for the content-free query.

    Both queries run in one row over one copy of the blocks, as two query segments that do not see each other
    but share one copy of the template text before `{query}` (identical for both, so run once). Template text
    after the query is left out: the query's own tokens never attend to it. No logits are computed.
    `grad=True` keeps the graph through the query-side pass (training a query-side adapter).
    """
    config, engine = rr.config, rr.engine
    texts = [query] + ([config.calibration_query] if config.calibrate else [])
    lead: list[int] = []
    new_ids: list[int] = []
    subs: list[int] = []
    spans = []
    for i, text in enumerate(texts):
        ids, start, end = rr.query_ids(text)
        assert not lead or lead == ids[:start], "every query part starts with the same template text"
        lead = ids[:start]
        spans.append((start + len(new_ids), end + len(new_ids)))
        new_ids += ids[start:end]
        subs += [i] * (end - start)
    new_ids, subs = lead + new_ids, [-1] * len(lead) + subs
    layout, _ = engine.layout(len(rr.prefix_ids), [blocks], [len(new_ids)], config.placement, [subs])
    n_seg = layout.n_blocks + 2 + len(texts)
    key_segments = torch.where(layout.valid, layout.segments, torch.zeros_like(layout.segments))
    read = read_layers(rr)
    capture = MassCapture(key_segments=key_segments, n_segments=n_seg, layers=frozenset(read))
    if rr.prefix_ids:
        engine.prefix_kv(rr.prefix_ids)  # computed (once) outside the capture
    with capture_mass(capture):
        engine.run(rr.prefix_ids, [blocks], [new_ids], config.placement, logits_to_keep=None,
                   new_segments=[subs], num_layers=max(read) + 1, grad=grad)
    heads, k = rr.lm.config.num_attention_heads, layout.n_blocks
    per_query = []
    for start, end in spans:
        per_query.append(torch.stack([
            query_token_mean(capture.mass[layer][0, :, :, 1:k + 1], start, end)  # (H, K)
            if layer in capture.mass else torch.zeros(heads, k)  # a layer no kept head reads
            for layer in range(engine.stored_layers)]))  # (L, H, K)
    return per_query[0], (per_query[1] if len(per_query) > 1 else None)


def attention_features(rr: BlockReranker, query: str, blocks: Sequence[PassageKV],
                       grad: bool = False) -> torch.Tensor:
    """Attention mass per (layer, head, block): [L, H, K], each (layer, head) a distribution over blocks.

    With `calibrate`, the distribution a content-free query puts on the blocks is subtracted (same pass, a
    second row), which removes what a block draws regardless of the query (length, sink tokens).
    """
    query_mass, free_mass = attention_mass(rr, query, blocks, grad)
    return query_mass - free_mass if free_mass is not None else query_mass


def attention_scores(rr: BlockReranker, query: str, blocks: Sequence[PassageKV], grad: bool = False) -> torch.Tensor:
    """(K,): the weighted sum of each block's features."""
    feats = attention_features(rr, query, blocks, grad)  # (L, H, K)
    return torch.einsum("lh,lhk->k", weight_matrix(rr, tuple(feats.shape[:2])), feats)


def query_token_mean(mass: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """mass (H, Tq, K) -> (H, K): mean over the query's own tokens of the mass normalised over blocks."""
    own = mass[:, start:end]  # (H, Lq, K)
    own = own / own.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return own.mean(dim=1)


def read_layers(rr: BlockReranker) -> list[int]:
    """Layers whose attention the score reads: every stored one, or those of the `attn_heads` kept."""
    if rr.config.attn_heads is None:
        return list(range(rr.engine.stored_layers))
    weights = weight_matrix(rr, (rr.engine.stored_layers, rr.lm.config.num_attention_heads))
    return sorted({int(i) for i in weights.nonzero()[:, 0]}) or [0]


def weight_matrix(rr: BlockReranker, shape: tuple[int, ...]) -> torch.Tensor:
    """[L, H] weights: explicit, shipped for this model + template ("auto"), or uniform; with `attn_heads`, all
    but the largest `attn_heads` are zeroed."""
    config = rr.config
    weights = config.attn_weights
    if weights == "auto":
        weights = shipped_weights(rr.engine.fingerprint, rr.template.name, config.calibrate)
    if weights is None:
        matrix = torch.full(shape, 1.0 / (shape[0] * shape[1]))
    else:
        matrix = torch.tensor(weights, dtype=torch.float32)
        if matrix.shape[0] == rr.lm.num_layers:
            matrix = matrix[: shape[0]]  # a format that stores fewer layers reads only theirs
        if tuple(matrix.shape) != tuple(shape):
            raise KvrankError(f"attn_weights has shape {tuple(matrix.shape)}, the model needs {tuple(shape)} "
                              "(layers, heads)", param="attn_weights")
    if config.attn_heads is not None and config.attn_heads < matrix.numel():
        keep = matrix.abs().flatten().topk(config.attn_heads).indices
        mask = torch.zeros(matrix.numel(), dtype=torch.bool)
        mask[keep] = True
        matrix = matrix * mask.view(matrix.shape)
    return matrix


def shipped_weights(fingerprint: str, template: str, calibrate: bool) -> tuple[tuple[float, ...], ...] | None:
    """The weights shipped for this model and template, if fitted on this kind of features (calibrated or not)."""
    return _load_shipped(WEIGHTS_DIR / f"{fingerprint}-{template}.json", calibrate)


@functools.lru_cache(maxsize=16)
def _load_shipped(path: Path, calibrate: bool) -> tuple[tuple[float, ...], ...] | None:
    """Shipped attn weights (read once per file, not once per query), or None if absent or fitted on the other
    kind of features."""
    if not path.is_file():
        return None
    shipped = json.loads(path.read_text())
    if (shipped["features"] == "calibrated") != calibrate:
        return None
    return tuple(tuple(row) for row in shipped["weights"])
