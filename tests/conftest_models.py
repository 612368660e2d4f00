"""Tiny random-initialised models of every supported architecture, with a byte-level tokenizer (no downloads)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from kvrank.reranker.model import LoadedLM, wrap_model

VOCAB = 260  # 256 bytes + specials
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=256, eos_token_id=257,
              pad_token_id=258)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"<bos>": 256, "<eos>": 257, "<pad>": 258, "<unk>": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


# Windows of 24 tokens are shorter than a prompt here, so sliding-window masking is exercised.
CONFIGS = {
    "llama": lambda w: LlamaConfig(**COMMON),
    "mistral": lambda w: MistralConfig(**COMMON, sliding_window=w),
    "qwen2": lambda w: Qwen2Config(**COMMON),
    "qwen3": lambda w: Qwen3Config(**COMMON, head_dim=16),
    "gemma3_text": lambda w: Gemma3TextConfig(**{**COMMON, "num_key_value_heads": 1}, head_dim=16, sliding_window=w,
                                              layer_types=["sliding_attention", "full_attention"],
                                              query_pre_attn_scalar=16),
}


def tiny_lm(arch: str, seed: int = 0, window: int = 24) -> LoadedLM:
    torch.manual_seed(seed)
    config = CONFIGS[arch](window)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return wrap_model(model, byte_tokenizer(), name=f"tiny-{arch}")
