"""Query-side adapters: low-rank weights that act on the query's side of the prompt only ("activated LoRA").

kvrank prefills a passage's KV once, with the base model, and stores it. An adapter is attached to the model with
PEFT's LoRA, but the engine switches it off for every passage-side pass (`LoadedLM.base_weights`), so it changes
only the tokens run at query time: the template's query part and the query. Hence training or attaching an
adapter never invalidates a store: entries, keys, the store's identity and every KV format stay byte for byte.

An adapter is a folder: `adapter.safetensors` (the LoRA weights) and `card.json` (what it was trained for and on).
Loading checks the card against the reranker (base model, mode, template) and refuses a mismatch by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from kvrank.errors import KvrankError
from kvrank.io import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter.safetensors"
CARD_FILE = "card.json"
CARD_FORMAT = "kvrank-adapter/1"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterCard:
    """What an adapter is for and how it was made. `digest` hashes the weights file (set when saved)."""

    base_fingerprint: str
    base_model: str
    mode: str
    template: str
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0
    training: dict[str, Any] = field(default_factory=dict)  # data digests, recipe, epochs, lr, queries, ...
    dev_metrics: dict[str, Any] = field(default_factory=dict)
    kvrank_version: str = ""
    digest: str = ""
    format: str = CARD_FORMAT

    def check(self, *, mode: str, template: str, fingerprint: str | None = None, where: str = "adapter") -> None:
        """Refuse a reranker this adapter was not trained for (one line naming both)."""
        if self.mode != mode:
            raise KvrankError(f"{where} was trained for mode {self.mode!r}, not {mode!r}; pass mode={self.mode!r} "
                              "or an adapter trained for this mode", param="adapter")
        if self.template != template:
            raise KvrankError(f"{where} was trained with template {self.template!r}, not {template!r}; use the "
                              "template it was trained with or another adapter", param="adapter")
        if fingerprint is not None and self.base_fingerprint != fingerprint:
            raise KvrankError(f"{where} was trained on base model {self.base_model!r} (fingerprint "
                              f"{self.base_fingerprint}), not this one ({fingerprint}); pass "
                              f"model={self.base_model!r} or an adapter for this model", param="adapter")


def read_card(folder: str | Path) -> AdapterCard:
    """The card of the adapter in `folder` (cheap: no weights are read)."""
    path = Path(folder).expanduser()
    card_path = path / CARD_FILE
    if not card_path.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise KvrankError(f"adapter {folder}: not an adapter folder (needs {CARD_FILE} and {WEIGHTS_FILE}); make "
                          "one with `kvrank train` or `kvrank tune`", param="adapter")
    try:
        data = json.loads(card_path.read_text(encoding="utf-8"))
        if data.get("format") != CARD_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {CARD_FORMAT!r}")
        data["targets"] = tuple(data["targets"])
        return AdapterCard(**data)
    except (ValueError, TypeError, KeyError) as err:
        raise KvrankError(f"adapter {folder}: {CARD_FILE} is not a kvrank adapter card ({err})",
                          param="adapter") from None


def attach(lm: Any, card: AdapterCard, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Attach a LoRA adapter described by `card` to `lm` (in place). `weights`: its trained tensors; None gives a
    fresh adapter whose up-projections are zero, so it changes no score until trained. One adapter per model."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    if lm.adapter is not None:
        raise KvrankError(f"the model already has an adapter attached ({lm.adapter.digest or 'untrained'}); load "
                          "the model again to use another one")
    card.check(mode=card.mode, template=card.template, fingerprint=lm.fingerprint)
    config = LoraConfig(r=card.rank, lora_alpha=card.alpha, lora_dropout=0.0, target_modules=list(card.targets),
                        bias="none")
    torch.manual_seed(card.seed)  # the down-projections' initialisation
    inject_adapter_in_model(config, lm.model)
    if weights is not None:
        unexpected = list(getattr(set_peft_model_state_dict(lm.model, weights), "unexpected_keys", []))
        if unexpected:
            raise KvrankError(f"adapter: {len(unexpected)} weights do not fit this model (e.g. {unexpected[0]}); "
                              "it was made for another architecture", param="adapter")
    lm.model.to(lm.device)
    lm.adapter = card
    lm._adapter_layers = [m for m in lm.model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in lm._adapter_layers:  # fp32 adapter weights even over a half-precision base
        for name, param in layer.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()


def load(folder: str | Path, lm: Any, *, mode: str, template: str) -> AdapterCard:
    """Check the adapter in `folder` against the reranker, then attach it to `lm`."""
    card = read_card(folder)
    card.check(mode=mode, template=template, fingerprint=lm.fingerprint, where=f"adapter {folder}")
    path = Path(folder).expanduser() / WEIGHTS_FILE
    data = path.read_bytes()
    if card.digest and _digest(data) != card.digest:
        raise KvrankError(f"adapter {folder}: {WEIGHTS_FILE} does not match the digest in {CARD_FILE} (a partial "
                          "copy?); copy the adapter folder again", param="adapter")
    attach(lm, card, load_file(str(path)))
    return lm.adapter


def trainable(lm: Any) -> list[torch.nn.Parameter]:
    """The adapter's parameters (the only ones training touches)."""
    return [p for name, p in lm.model.named_parameters() if "lora_" in name]


def state(lm: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(lm.model).items()}


def save_adapter(folder: str | Path, lm: Any, card: AdapterCard) -> AdapterCard:
    """Write the attached adapter's weights and `card` (with the weights' digest) into `folder`, atomically per
    file, weights first: a reader never sees a card whose weights are missing or stale."""
    from kvrank import __version__

    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    data = save(state(lm), metadata={"format": CARD_FORMAT})
    card = AdapterCard(**{**asdict(card), "digest": _digest(data), "kvrank_version": __version__})
    atomic_write_bytes(path / WEIGHTS_FILE, data)
    atomic_write_text(path / CARD_FILE, json.dumps(asdict(card), indent=2, sort_keys=True) + "\n")
    return card


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()
