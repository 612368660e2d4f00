"""The block engine: prefill passages as independent blocks, then run new tokens over stored blocks.

Both operations call the model's own forward with an explicit 4D block mask, explicit RoPE positions and a
`DynamicCache` assembled from stored KV, so every architecture in `model.ARCHITECTURES` works unchanged.

Slot layout of one batch row (cache order):  [prefix P][block 1][block 2]...[padding][new tokens]
- the prefix sits at positions 0..P-1; every block attends to the prefix and itself only;
- "parallel" placement puts every block at positions P..P+T_j-1 (no position bias between blocks);
  "sequential" placement puts them one after another, re-rotating the stored keys to their new positions;
- new tokens (query and template) start right after the furthest block position and attend to everything.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.profiler import record_function
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvrank.attention.capture import active_capture, grouped_sdpa
from kvrank.attention.functional import StoredBlock, block_mask, rerotate
from kvrank.attention.kvformat import KVCodec, KVFormat, scale_names
from kvrank.reranker.model import LoadedLM
from kvrank.store.kv import KVKey, PassageKV

PLACEMENTS = ("parallel", "sequential")
# Prefill pads every block to the next multiple of this many tokens, and a batch holds blocks of one padded length
# only. The padded length changes the kernels' blocking and so the last bits of the KV (measured on CPU: 3 of 40
# blocks differed when batched with a longer block, none when batched with blocks of their own padded length).
# A block's stored bytes then depend on its own tokens alone, never on which blocks shared its batch: two workers
# (or a resumed `kvrank warm`, or an eval that prefills misses query by query) store identical entries.
PAD_MULTIPLE = 16


def padded_length(tokens: int) -> int:
    """The length a block of `tokens` tokens is prefilled at (see `PAD_MULTIPLE`)."""
    return -(-tokens // PAD_MULTIPLE) * PAD_MULTIPLE


class PreallocatedLayer(DynamicLayer):
    """A cache layer whose tensors already have room for the new tokens: `update` writes in place instead of
    concatenating (which would copy every stored block once per layer per query)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int, hidden: int = 0):
        super().__init__()
        self.keys: torch.Tensor = keys  # (B, Hkv, width, D)
        self.values: torch.Tensor = values
        self.device, self.is_initialized, self.filled = keys.device, True, filled
        self.hidden = hidden  # stored slots the attention kernel reads itself (`StreamedBlocks`), not held here

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        self.keys[:, :, self.filled:self.filled + n] = key_states
        self.values[:, :, self.filled:self.filled + n] = value_states
        self.filled += n
        return self.keys[:, :, :self.filled], self.values[:, :, :self.filled]

    def get_seq_length(self) -> int:
        return self.filled + self.hidden

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.filled + self.hidden + query_length, 0


@dataclass
class StreamedBlocks:
    """One row's stored blocks at one layer, decoded chunk by chunk where the attention kernel reads them
    (`kvrank.attention.functional.StoredKeys`) instead of being assembled into a [Hkv, width, D] tensor per layer:
    the cast or decode then runs on cache-sized pieces right before their matmul."""

    engine: BlockEngine
    row: Sequence[PassageKV]
    offsets: list[int]
    start: int  # first slot of the first block (the prefix length)
    dtype: torch.dtype
    layer: int

    def __post_init__(self) -> None:
        ends = list(itertools.accumulate(kv.num_tokens for kv in self.row))
        self.length = ends[-1] if ends else 0
        self._first = {self.start + e - kv.num_tokens: i for i, (e, kv) in enumerate(zip(ends, self.row))}
        self._last = {self.start + e: i for i, e in enumerate(ends)}

    def kv(self, a: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = self._first[a], self._last[z] + 1  # the kernel's chunks are whole blocks
        keys, values = self.engine.row_kv(self.row[i:j], self.offsets[i:j], self.layer, self.start, self.dtype)
        return keys[None], values[None]  # (1, Hkv, z - a, D)

    def blocks(self) -> list[StoredBlock]:
        lengths, layer = [kv.num_tokens for kv in self.row], self.layer
        if self.engine.stored_as_is(self.offsets):  # the stored tensors themselves, each (Hkv, T_b, D)
            blocks = [StoredBlock(kv.keys[layer], kv.values[layer]) for kv in self.row]
        elif self.engine.stored_as_int8(self.offsets):  # int8 codes and their scales, decoded inside the kernel
            k_scales, v_scales = scale_names(layer)
            blocks = [StoredBlock(kv.keys[layer], kv.values[layer], kv.aux[k_scales], kv.aux[v_scales])
                      for kv in self.row]
        else:  # decoded once per layer, then split into views
            keys, values = self.engine.row_kv(self.row, self.offsets, layer, self.start, self.dtype)
            blocks = [StoredBlock(k, v) for k, v in zip(keys.split(lengths, dim=1), values.split(lengths, dim=1))]
        return [block for block, n in zip(blocks, lengths) if n]


@dataclass
class RowLayout:
    """Per-slot bookkeeping for a batch: all tensors are [B, S] over S = P + L (stored) + Tq (new) slots."""

    segments: torch.Tensor  # 0 prefix, j block j (1-based), then the new tokens' segments (see `BlockEngine.layout`)
    positions: torch.Tensor
    valid: torch.Tensor
    n_blocks: int
    lead_segment: int | None = None  # a shared lead every query segment sees (None: none)

    @property
    def query_segment(self) -> int:
        return self.n_blocks + 1


def _filled_layers(cache: DynamicCache, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of the first `n` layers of a cache a forward pass has filled."""
    out = []
    for layer in cache.layers[:n]:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        assert isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor), "the forward filled no KV"
        out.append((keys, values))
    return out


class _StopForward(Exception):
    """Raised by a forward hook after the last layer a pass needs (layer selection)."""


@contextmanager
def _stop_after(lm: LoadedLM, layers: int, logits: bool = True) -> Iterator[None]:
    """Run the model's forward only through its first `layers` decoder layers (no-op for all of them, unless
    `logits` is False: then the final norm and the LM head are skipped too)."""
    if layers >= lm.num_layers and logits:
        yield
        return

    def stop(*_: object) -> None:
        raise _StopForward

    handle = lm.model.model.layers[min(layers, lm.num_layers) - 1].register_forward_hook(stop)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()


class BlockEngine:
    """Prefill passages into `PassageKV` blocks and run new tokens over them, batched.

    `kv_format` (default: uncompressed) sets how blocks are stored; `basis` holds its fitted projections.
    """

    def __init__(self, lm: LoadedLM, storage_dtype: torch.dtype = torch.float16, batch_size: int = 16,
                 kv_format: KVFormat | None = None, basis: dict[str, torch.Tensor] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lm = lm
        self.storage_dtype = storage_dtype
        self.batch_size = batch_size
        self.fingerprint = lm.fingerprint
        self._prefix_cache: dict[tuple[int, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._rope_cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._pad_id = 0
        self._layer_types = lm.layer_types()  # read per block and layer while decoding
        kv_format = kv_format or KVFormat()
        kv_format.check(lm.num_layers, lm.kv_heads, lm.head_dim)
        self.codec = KVCodec(kv_format, storage_dtype, basis, self.rope, lm.kv_heads, lm.head_dim)
        self.stored_layers = kv_format.stored_layers(lm.num_layers)

    # ---------------------------------------------------------------- prefill
    @torch.no_grad()
    def prefill(self, prefix_ids: Sequence[int], blocks: Sequence[Sequence[int]],
                keys: Sequence[KVKey]) -> list[PassageKV]:
        """Encode each block (attending to the prefix and itself) and return its KV in the storage dtype."""
        if any(len(b) == 0 for b in blocks):
            raise ValueError("every block needs at least one token")
        order = sorted(range(len(blocks)), key=lambda i: len(blocks[i]))  # similar lengths share a batch
        out: list[PassageKV | None] = [None] * len(blocks)
        for _, same_length in itertools.groupby(order, key=lambda i: padded_length(len(blocks[i]))):
            group = list(same_length)
            for start in range(0, len(group), self.batch_size):
                idx = group[start:start + self.batch_size]
                batch = self._prefill_batch(prefix_ids, [blocks[i] for i in idx], [keys[i] for i in idx])
                for i, kv in zip(idx, batch):
                    out[i] = kv
        return [kv for kv in out if kv is not None]

    def _prefill_batch(self, prefix_ids: Sequence[int], blocks: list[Sequence[int]],
                       keys: list[KVKey]) -> list[PassageKV]:
        """One row per block: prefix + block. With one block per row, "prefix + own block" is exactly the causal
        mask, and right padding is never seen by real tokens, so the model builds its own masks (causal, sliding
        windows by slot = position) and takes its fastest attention path. A config-less cache keeps every layer
        whole (a config-built one would trim sliding-window layers)."""
        b, p, t_max = len(blocks), len(prefix_ids), padded_length(max(len(x) for x in blocks))
        device = self.lm.device
        # The (short) prefix runs again in every row: queries and keys then have the same length, which lets SDPA
        # take its causal kernel instead of a materialised mask (~1.5x faster on CPU than reusing the prefix KV).
        ids = torch.full((b, p + t_max), self._pad_id, dtype=torch.long, device=device)
        for i, block in enumerate(blocks):
            ids[i, : p + len(block)] = torch.tensor([*prefix_ids, *block], device=device)
        positions = torch.arange(p + t_max, device=device).expand(b, -1)  # (B, P+T)
        cache = DynamicCache()
        # the base model only (an attached query-side adapter is off), and a format that keeps L layers needs L
        with self.lm.base_weights(), _stop_after(self.lm, self.stored_layers):
            self.lm.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        layers = _filled_layers(cache, self.stored_layers)  # per layer (B, Hkv, P+T, D) keys and values
        if self.codec.fmt.transforms:
            out = []
            for i, (block, key) in enumerate(zip(blocks, keys)):
                n = len(block)
                k, v, aux = self.codec.encode([keys_[i, :, p:p + n] for keys_, _ in layers],
                                              [values[i, :, p:p + n] for _, values in layers], start=p)
                out.append(PassageKV(key=key, keys=k, values=v, aux=aux))
            return out
        stored = [(keys_[:, :, p:].to(self.storage_dtype), values[:, :, p:].to(self.storage_dtype))
                  for keys_, values in layers]  # per layer (B, Hkv, T, D), one cast each
        return [PassageKV(key=key,
                          keys=[k[i, :, : len(block)].clone() for k, _ in stored],  # per layer (Hkv, T_i, D)
                          values=[v[i, :, : len(block)].clone() for _, v in stored])
                for i, (block, key) in enumerate(zip(blocks, keys))]

    @torch.no_grad()
    def prefix_kv(self, prefix_ids: Sequence[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """KV of the shared prefix, computed once per prefix and kept in the compute dtype: (Hkv, P, D) per layer."""
        cache_key = tuple(prefix_ids)
        if cache_key not in self._prefix_cache:
            # Config-less cache: sliding-window layers keep every prefix key (blocks at shared positions see them).
            ids = torch.tensor([list(prefix_ids)], device=self.lm.device)
            with self.lm.base_weights():  # the prefix is passage-side: never adapted
                out = self.lm.model(input_ids=ids, cache=DynamicCache(), use_cache=True, logits_to_keep=1)
            self._prefix_cache[cache_key] = ([layer.keys[0] for layer in out.cache.layers],
                                             [layer.values[0] for layer in out.cache.layers])
        return self._prefix_cache[cache_key]

    # ---------------------------------------------------------------- query-time pass
    @torch.no_grad()
    def layout(self, prefix_len: int, rows: Sequence[Sequence[PassageKV]], new_lens: Sequence[int],
               placement: str = "parallel", new_segments: Sequence[Sequence[int]] | None = None,
               ) -> tuple[RowLayout, list[list[int]]]:
        """Slots, positions and segments for rows of blocks followed by new tokens; also each block's offset.

        `new_segments[r][t]` (default all 0) splits row r's new tokens into query segments that see the blocks
        but not each other, each starting at the same position (several queries over one copy of the blocks).
        Tokens marked -1 form a shared lead: it comes first, and every query segment sees it and starts after it
        (template text before the query, run once for a real and a content-free query instead of once for each).
        """
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        b, device = len(rows), self.lm.device
        stored = max(sum(kv.num_tokens for kv in row) for row in rows)
        tq, n_blocks = max(new_lens), max(len(row) for row in rows)
        lead = new_segments is not None and any(sub < 0 for row in new_segments for sub in row)
        width = prefix_len + stored + tq
        segments = torch.zeros((b, width), dtype=torch.long, device=device)
        positions = torch.zeros((b, width), dtype=torch.long, device=device)
        valid = torch.zeros((b, width), dtype=torch.bool, device=device)
        positions[:, :prefix_len] = torch.arange(prefix_len, device=device)
        valid[:, :prefix_len] = True
        offsets: list[list[int]] = []
        for r, row in enumerate(rows):
            slot, pos, end, row_offsets = prefix_len, prefix_len, prefix_len, []
            for j, kv in enumerate(row):
                n = kv.num_tokens
                segments[r, slot:slot + n] = j + 1
                positions[r, slot:slot + n] = torch.arange(pos, pos + n, device=device)
                valid[r, slot:slot + n] = True
                row_offsets.append(pos - prefix_len)  # how far this block moved from its canonical positions
                slot += n
                end = max(end, pos + n)
                if placement == "sequential":
                    pos += n
            offsets.append(row_offsets)
            q0 = prefix_len + stored
            subs = [x + lead for x in new_segments[r]] if new_segments is not None else [0] * new_lens[r]
            subs += [max(subs, default=0)] * (tq - len(subs))  # padding joins the last segment (masked anyway)
            n_lead = subs.count(0) if lead else 0
            seen: dict[int, int] = {}
            for t, sub in enumerate(subs):
                segments[r, q0 + t] = n_blocks + 1 + sub
                positions[r, q0 + t] = end + (n_lead if sub > 0 else 0) + seen.get(sub, 0)
                seen[sub] = seen.get(sub, 0) + 1
            valid[r, q0:q0 + new_lens[r]] = True
        return RowLayout(segments, positions, valid, n_blocks, n_blocks + 1 if lead else None), offsets

    def run(self, prefix_ids: Sequence[int], rows: Sequence[Sequence[PassageKV]], new_ids: Sequence[Sequence[int]],
            placement: str = "parallel", logits_to_keep: int | torch.Tensor | None = 0,
            new_segments: Sequence[Sequence[int]] | None = None,
            num_layers: int | None = None, grad: bool = False) -> tuple[torch.Tensor | None, RowLayout]:
        """Run `new_ids[r]` over prefix + `rows[r]` blocks; returns logits [B, Tq, V] and the layout.

        With a format that stores fewer layers than the model has, or `num_layers` below them, the pass stops after
        those layers and logits are None (attention capture still sees each of them); `logits_to_keep=None` skips
        the final norm and LM head even over every layer (passes that read only attention). `grad=True` keeps the
        graph of the new tokens' pass (training a query-side adapter; the stored blocks never need gradients)."""
        with torch.set_grad_enabled(grad):
            return self._run(prefix_ids, rows, new_ids, placement, logits_to_keep, new_segments, num_layers)

    def _run(self, prefix_ids: Sequence[int], rows: Sequence[Sequence[PassageKV]], new_ids: Sequence[Sequence[int]],
             placement: str, logits_to_keep: int | torch.Tensor | None, new_segments: Sequence[Sequence[int]] | None,
             num_layers: int | None) -> tuple[torch.Tensor | None, RowLayout]:
        if len(rows) != len(new_ids):
            raise ValueError(f"{len(rows)} rows of blocks but {len(new_ids)} rows of new tokens")
        p = len(prefix_ids)
        layout, offsets = self.layout(p, rows, [len(x) for x in new_ids], placement, new_segments)
        b, tq = len(rows), max(len(x) for x in new_ids)
        device, dtype = self.lm.device, self.lm.dtype
        ids = torch.full((b, tq), self._pad_id, dtype=torch.long, device=device)
        for r, row_ids in enumerate(new_ids):
            ids[r, : len(row_ids)] = torch.tensor(list(row_ids), device=device)
        layers = min(self.stored_layers, num_layers or self.stored_layers)
        cache = DynamicCache()
        capture = active_capture()
        if capture is not None and not capture.reference and b == 1 and not torch.is_grad_enabled():
            # One row under attention capture (the attn pass): the kernel reads the stored blocks chunk by chunk,
            # the cache holds only the prefix and the new tokens.
            capture.stored = functools.partial(StreamedBlocks, self, rows[0], offsets[0], p, dtype)
            hidden = sum(kv.num_tokens for kv in rows[0])
            with record_function("kvrank.assemble_kv"):
                cache.layers = [PreallocatedLayer(k, v, filled=p, hidden=hidden) for k, v in
                                self._assemble(prefix_ids, [[]], [[]], p + tq, dtype, layers)]
        else:
            with record_function("kvrank.assemble_kv"):
                cache.layers = [PreallocatedLayer(k, v, filled=k.shape[2] - tq) for k, v in
                                self._assemble(prefix_ids, rows, offsets, layout.segments.shape[1], dtype, layers)]
        with record_function("kvrank.masks"):
            masks = self._masks(layout, tq, layout.query_segment)
        out = None
        with record_function("kvrank.forward"), _stop_after(self.lm, layers, logits=logits_to_keep is not None), \
                grouped_sdpa():
            out = self.lm.model(input_ids=ids, attention_mask=masks, position_ids=layout.positions[:, -tq:],
                                cache=cache, use_cache=True,
                                logits_to_keep=1 if logits_to_keep is None else logits_to_keep)
        return (out.logits if out is not None else None), layout

    def _assemble(self, prefix_ids: Sequence[int], rows: Sequence[Sequence[PassageKV]], offsets: list[list[int]],
                  width: int, dtype: torch.dtype, n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cache tensors [B, Hkv, width, D]: prefix, then each row's blocks (keys moved where placed),
        then zeros where a row is shorter than the longest, then room for the new tokens (written by the pass).

        Uncompressed blocks that stay at their canonical positions are cast straight into their slots (one read of
        the stored bytes, no concatenated or stacked copy); other formats are decoded per row first."""
        p, b, device = len(prefix_ids), len(rows), self.lm.device
        hkv, d, tq = self.lm.kv_heads, self.lm.head_dim, width - p - max(sum(kv.num_tokens for kv in row)
                                                                          for row in rows)
        prefix = self.prefix_kv(prefix_ids) if p else None
        direct = not self.codec.fmt.transforms
        layers = []
        for layer in range(n_layers):
            k = torch.empty((b, hkv, width, d), dtype=dtype, device=device)  # (B, Hkv, width, D)
            v = torch.empty_like(k)
            if prefix is not None:
                k[:, :, :p] = prefix[0][layer]
                v[:, :, :p] = prefix[1][layer]
            for r, row in enumerate(rows):
                end = p
                if direct and not any(offsets[r]):
                    for kv in row:
                        n = kv.num_tokens
                        k[r, :, end:end + n] = kv.keys[layer]  # (Hkv, T_j, D), cast to the compute dtype
                        v[r, :, end:end + n] = kv.values[layer]
                        end += n
                elif row:
                    keys, values = self.row_kv(row, offsets[r], layer, p, dtype)
                    end = p + keys.shape[1]
                    k[r, :, p:end] = keys
                    v[r, :, p:end] = values
                k[r, :, end:width - tq] = 0  # padding: masked, but must be finite (0 x NaN would be NaN)
                v[r, :, end:width - tq] = 0
            layers.append((k, v))
        return layers

    def row_kv(self, row: Sequence[PassageKV], offsets: Sequence[int], layer: int, p: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks' KV at one layer, decoded and concatenated along T, keys moved by `offsets`: (Hkv, T, D) each."""
        if self.stored_as_is(offsets):
            return (torch.cat([kv.keys[layer] for kv in row], dim=1).to(dtype),
                    torch.cat([kv.values[layer] for kv in row], dim=1).to(dtype))
        keys, values = self.codec.decode_blocks([kv.keys[layer] for kv in row], [kv.values[layer] for kv in row],
                                                [kv.aux for kv in row], layer, p, dtype)  # (Hkv, T, D)
        if any(offsets):
            blocks = keys.split([kv.num_tokens for kv in row], dim=1)
            keys = torch.cat([rerotate(x.to(dtype), *self._rope_delta(o, x.shape[-2], layer, dtype)) if o else x
                              for x, o in zip(blocks, offsets)], dim=1)
        return keys.to(dtype), values.to(dtype)

    def stored_as_is(self, offsets: Sequence[int]) -> bool:
        """Whether blocks placed at `offsets` are used as stored: no decode, no keys moved."""
        return not self.codec.fmt.transforms and not any(offsets)

    def stored_as_int8(self, offsets: Sequence[int]) -> bool:
        """Whether blocks placed at `offsets` are int8 codes with per-channel key and per-token value scales and
        nothing else to undo (no latent, no merged heads, no keys moved)."""
        return self.codec.plain_int8 and not any(offsets)

    def _rope_delta(self, offset: int, n: int, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [n, D] of a constant shift by `offset` positions, from the model's own rotary embedding."""
        pos = torch.full((1, n), offset, dtype=torch.long, device=self.lm.device)
        return self._rotary(pos, layer, dtype)

    def rope(self, layer: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin [n, D] of positions start..start+n-1 at `layer` (cached: blocks share canonical positions)."""
        cache_key = (self._layer_types[layer] == "sliding_attention", start, n)
        if cache_key not in self._rope_cache:
            pos = torch.arange(start, start + n, device=self.lm.device)[None]
            self._rope_cache[cache_key] = self._rotary(pos, layer, torch.float32)
        return self._rope_cache[cache_key]

    def _rotary(self, pos: torch.Tensor, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = self.lm.model.model.rotary_emb
        x = torch.zeros((), dtype=dtype, device=self.lm.device)
        layer_type = self._layer_types[layer]
        if self.lm.spec.mask_by_layer_type and hasattr(rotary, "layer_types"):
            cos, sin = rotary(x, pos, layer_type)
            scaling = getattr(rotary, f"{layer_type}_attention_scaling", 1.0)
        else:
            cos, sin = rotary(x, pos)
            scaling = getattr(rotary, "attention_scaling", 1.0)
        return cos[0] / scaling, sin[0] / scaling

    def _masks(self, layout: RowLayout, n_new: int,
               query_segment: int | None) -> torch.Tensor | dict[str, torch.Tensor]:
        """4D additive masks for the last `n_new` slots, one per layer type when the model takes a mapping."""
        dtype = self.lm.dtype

        def build(window: int | None) -> torch.Tensor:
            return block_mask(layout.segments, layout.positions, query_segment, layout.valid, window, dtype,
                              last=n_new, lead_segment=layout.lead_segment)  # (B, 1, n_new, S)

        if not self.lm.spec.mask_by_layer_type:
            return build(self.lm.window("full_attention"))
        return {t: build(self.lm.window(t)) for t in set(self.lm.layer_types())}
