"""FLOPs of a call (torch's `FlopCounterMode`, CPU SDPA included) and the query-time FLOP budget of a pass.

`FlopCounterMode` counts matmuls (`mm`, `bmm`) and knows the CUDA attention kernels, but not the CPU SDPA kernel
(`_scaled_dot_product_flash_attention_for_cpu`), so attention run by SDPA on CPU would count as free; `count_flops`
adds it with the usual 4 x B x H x Tq x Tk x D (scores and weighted sum), and the same for kvrank's own fused CPU
kernel of the `attn` pass (`kvrank::block_mass`).

`pass_budget` is what a pass over new tokens must cost, from the model's shapes alone: every new token through the
projections and MLP of each layer it runs, attention of every new token over the keys its row holds, and the LM head
only at positions whose logits are read. Tests (tests/test_flop_budget.py) hold each scoring mode to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from kvrank.attention import native

T = TypeVar("T")


def _cpu_sdpa_flop(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any,
                   out_shape: Any = None, **kwargs: Any) -> int:
    b, h, tq, d = query_shape  # keys may have fewer heads (GQA); every query head reads them
    tk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * tq * tk * d + 2 * b * h * tq * tk * dv


CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
                torch.ops.kvrank.block_mass: native.block_mass_flop}


def count_flops(fn: Callable[[], T]) -> tuple[T, int, dict[str, int]]:
    """Run `fn` under a FLOP counter: its result, total FLOPs, and FLOPs per operator."""
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)
    with counter:
        result = fn()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return result, int(counter.get_total_flops()), per_op


@dataclass(frozen=True)
class ModelShapes:
    """The shapes a decoder's FLOPs depend on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> ModelShapes:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, config.hidden_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, config.intermediate_size,
                   config.vocab_size)

    @property
    def token_layer(self) -> int:
        """One token through one layer's projections (q, k, v, o) and gated MLP (gate, up, down)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * d * q + 2 * 2 * d * kv + 2 * q * d + 3 * 2 * d * self.intermediate

    def attention(self, queries: int, keys: int) -> int:
        """One layer's attention of `queries` tokens over `keys` keys (scores and weighted sum)."""
        return 4 * self.heads * self.head_dim * queries * keys

    @property
    def lm_head(self) -> int:
        return 2 * self.hidden * self.vocab


def pass_budget(shapes: ModelShapes, rows: list[tuple[int, int]], logits: int, layers: int | None = None) -> int:
    """FLOPs of one pass: `rows` as (new tokens, keys the row holds, new tokens included), `logits` positions
    projected on the vocabulary in all, through `layers` layers (default all)."""
    n = shapes.layers if layers is None else layers
    body = sum(n * (tokens * shapes.token_layer + shapes.attention(tokens, keys)) for tokens, keys in rows)
    return body + logits * shapes.lm_head
