"""Block-attention math as pure functions: masks, RoPE re-rotation, GQA/MQA head expansion, attention mass.

KV layout (the one layout used everywhere in kvrank): per layer, keys and values are `[kv_heads, T, head_dim]` for
one passage and `[B, kv_heads, T, head_dim]` for a batch. Keys are stored *after* RoPE at canonical positions
`P .. P+T-1`, where `P` is the length of the shared prefix the block attended to; `rerotate` moves them elsewhere.
"""

from kvrank.attention.functional import (
    NEG_INF,
    apply_rope,
    block_attention,
    block_mask,
    repeat_kv,
    rerotate,
    segment_mass,
)

__all__ = ["NEG_INF", "apply_rope", "block_attention", "block_mask", "repeat_kv", "rerotate", "segment_mass"]
