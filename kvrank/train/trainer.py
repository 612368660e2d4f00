"""Train a query-side adapter over stored passage KV.

Every epoch reuses the same passage KV: `BlockReranker.passage_kv` reads it from the reranker's store (prefilled
once, by the frozen base model), so an epoch costs only the query-side passes. The scores are the mode's own
(`ScoringMode.score`, the function `score_many` uses, with `grad=True`); its record names the loss:
- `listwise` (`ql`, `yesno`): softmax cross-entropy over a query's candidates, targets (2^rel - 1), normalised;
- `infonce` (`attn`): InfoNCE on the attention-mass scores of the blocks (BlockRank's objective), positives
  against the other candidates of the same row.

A run writes a checkpoint (adapter weights, optimiser state, position) atomically every `checkpoint_every`
queries and at each epoch's end, and resumes from it after a kill; the same seed and data give the same adapter,
interrupted or not.
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from kvrank.errors import KvrankError
from kvrank.io import atomic_write_text, publishing
from kvrank.reranker import adapter as adapters
from kvrank.reranker.adapter import AdapterCard
from kvrank.reranker.modes import SCORING_MODES
from kvrank.reranker.reranker import BlockReranker
from kvrank.train.lists import TrainList, lists_digest

logger = logging.getLogger(__name__)

CHECKPOINT = ".checkpoint"
HISTORY = "history.json"
PRIMARY = "nDCG@10"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    lr: float = 2e-4
    temperature: float = 0.2  # ql/yesno scores (mean log-probabilities, logit gaps) are divided by it
    attn_temperature: float = 0.05  # attention-mass differences are small
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 25  # queries between checkpoints

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise KvrankError(f"epochs must be >= 1, got {self.epochs}", param="epochs")
        if self.lr <= 0:
            raise KvrankError(f"lr must be > 0, got {self.lr}", param="lr")


@dataclass
class History:
    """What a run did, for the card, the report and the plot: loss per query, dev metrics per epoch (epoch 0 is
    the base model, before any training)."""

    loss: list[float] = field(default_factory=list)
    dev: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    queries: int = 0
    kv_hits: int = 0
    kv_misses: int = 0


DevFn = Callable[[BlockReranker], dict[str, float]]


def list_loss(reranker: BlockReranker, item: TrainList, config: TrainConfig) -> tuple[torch.Tensor, int, int]:
    """The loss of one training list, and its passage-KV hits and misses."""
    blocks, misses = reranker.passage_kv(item.passages)
    mode = reranker.scoring_mode
    scores = mode.score(reranker, [item.query.text], [blocks], True)[0]  # (K,)
    labels = torch.tensor(item.labels, dtype=torch.float32)
    if mode.loss == "infonce":
        logits = scores / config.attn_temperature
        positive = labels > 0
        loss = -(torch.logsumexp(logits[positive], 0) - torch.logsumexp(logits, 0))
    else:
        target = torch.pow(2.0, labels) - 1.0
        target = target / target.sum()
        loss = -(target * torch.log_softmax(scores / config.temperature, dim=0)).sum()
    return loss, len(blocks) - misses, misses


def train(reranker: BlockReranker, lists: Sequence[TrainList], config: TrainConfig, out: str | Path, *,
          card: AdapterCard, dev: DevFn | None = None, show_progress: bool = True) -> tuple[AdapterCard, History]:
    """Train an adapter (attached to `reranker.lm`, fresh or resumed) on `lists`; save the best one into `out`
    (by dev nDCG@10 when `dev` is given, epoch 0 = no change included; else the last) and return its card."""
    if not lists:
        raise KvrankError("no training lists; give data with judged queries, or pseudo-queries", param="lists")
    if not reranker.scoring_mode.trainable:
        trainable = ", ".join(name for name, mode in SCORING_MODES.items() if mode.trainable)
        raise KvrankError(f"mode {reranker.config.mode!r} cannot be trained; use one of {trainable}", param="mode")
    out = Path(out).expanduser()
    digest = lists_digest(lists)
    ckpt = out / CHECKPOINT
    state = _read_state(ckpt)
    if state is not None and (state["lists"] != digest or state["config"] != asdict(config)):
        raise KvrankError(f"out {out} holds a checkpoint of another training run (other data or settings); pass "
                          "another out folder, or delete it to start over", param="out")
    torch.manual_seed(config.seed)
    if reranker.lm.adapter is None:
        adapters.attach(reranker.lm, card)
    params = adapters.trainable(reranker.lm)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    history = History()
    epoch, done = 1, 0
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    if state is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(reranker.lm.model, load_file(str(ckpt / adapters.WEIGHTS_FILE)))
        optimizer.load_state_dict(torch.load(io.BytesIO((ckpt / "optimizer.pt").read_bytes()), weights_only=True))
        epoch, done = state["epoch"], state["done"]
        history = History(**state["history"])
        if state.get("best_score") is not None:
            best = (state["best_score"], load_file(str(ckpt / "best.safetensors")))
        logger.info("resuming from %s: epoch %d, %d queries done", ckpt, epoch, done)
    elif dev is not None:
        history.dev.append(dev(reranker))  # epoch 0: the base model
        best = (history.dev[-1].get(PRIMARY, 0.0), adapters.state(reranker.lm))
    started = time.perf_counter() - history.seconds
    while epoch <= config.epochs:
        order = list(range(len(lists)))
        random.Random(config.seed * 1000 + epoch).shuffle(order)
        bar = tqdm(total=len(order), initial=done, desc=f"epoch {epoch}/{config.epochs}", disable=not show_progress)
        t_epoch, n_epoch = time.perf_counter(), 0
        while done < len(order):
            item = lists[order[done]]
            loss, hits, misses = list_loss(reranker, item, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.loss.append(loss.item())
            history.kv_hits += hits
            history.kv_misses += misses
            history.queries += 1
            done += 1
            n_epoch += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(history.loss[-20:]) / len(history.loss[-20:]):.3f}",
                            qps=f"{n_epoch / (time.perf_counter() - t_epoch):.2f}")
            if done % config.checkpoint_every == 0 and done < len(order):
                history.seconds = time.perf_counter() - started
                _write_state(ckpt, reranker, optimizer, epoch, done, history, best, digest, config)
        bar.close()
        if dev is not None:
            history.dev.append(dev(reranker))
            score = history.dev[-1].get(PRIMARY, 0.0)
            if best is None or score > best[0]:
                best = (score, adapters.state(reranker.lm))
        epoch, done = epoch + 1, 0
        history.seconds = time.perf_counter() - started
        _write_state(ckpt, reranker, optimizer, epoch, done, history, best, digest, config)
    if best is not None:  # keep the best epoch (by dev), possibly the untrained adapter of epoch 0
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(reranker.lm.model, best[1])
    best_epoch = max(range(len(history.dev)), key=lambda i: history.dev[i].get(PRIMARY, 0.0)) if history.dev else None
    card = replace(card, training={**card.training, "lists_digest": digest, "queries": len(lists),
                                   "epochs": config.epochs, "lr": config.lr, "temperature": config.temperature,
                                   "best_epoch": best_epoch, "seconds": round(history.seconds, 1),
                                   "kv_hit_rate": round(history.kv_hits / max(1, history.kv_hits + history.kv_misses),
                                                        4)},
                   dev_metrics=history.dev[best_epoch] if best_epoch is not None else {})
    card = adapters.save_adapter(out, reranker.lm, card)
    atomic_write_text(out / HISTORY, json.dumps(asdict(history), indent=2) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)  # the adapter is complete: the folder holds only what ships
    return card, history


def _read_state(ckpt: Path) -> dict[str, Any] | None:
    path = ckpt / "state.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _write_state(ckpt: Path, reranker: BlockReranker, optimizer: torch.optim.Optimizer, epoch: int, done: int,
                 history: History, best: tuple[float, dict[str, torch.Tensor]] | None, digest: str,
                 config: TrainConfig) -> None:
    """The whole checkpoint (weights, optimiser, best so far, position) is written into a staging folder and
    published with one rename: a kill at any point leaves the previous checkpoint or the new one, never a mix."""
    with publishing(ckpt) as staging:
        (staging / adapters.WEIGHTS_FILE).write_bytes(save(adapters.state(reranker.lm)))
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        (staging / "optimizer.pt").write_bytes(buffer.getvalue())
        if best is not None:
            (staging / "best.safetensors").write_bytes(save(best[1]))
        state = {"epoch": epoch, "done": done, "history": asdict(history), "lists": digest,
                 "config": asdict(config), "best_score": best[0] if best is not None else None}
        (staging / "state.json").write_text(json.dumps(state) + "\n", encoding="utf-8")
