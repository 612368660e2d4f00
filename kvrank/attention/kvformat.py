"""Compressed layouts of stored passage KV: quantised codes, low-rank latents, merged KV heads, fewer layers.

A `KVFormat` is a named combination of components joined by "+" (`kv_format="rank32+int8"`); its name is part of
every KV key and of a store's identity, so a store never mixes layouts. `KVCodec` turns one block's per-layer KV
(`[kv_heads, T, head_dim]`, keys post-RoPE at canonical positions start..start+T-1) into the stored tensors and
back. Fitted components take their projections from `fit_basis` over calibration passages of the corpus.

Components:
- `int8` / `int4`: symmetric codes with fp16 scales, per channel for keys (outlier channels) and per token for
  values (KIVI's axes); 4-bit codes are packed two per byte. Latents (rank/heads) get per-channel scales for
  values too: principal components differ in size by orders of magnitude, so one scale per token would spend the
  codes on the first components.
- `rank<R>` / `rank<RK>:<RV>`: per layer, the keys and values of all KV heads (`[T, kv_heads*head_dim]`) are
  projected on the top principal directions of the calibration passages (an MLA/Palu-style latent) and
  reconstructed at scoring time. Keys are projected *before* RoPE: stored keys are rotated back from their
  canonical positions, projected, and rotated again after reconstruction, so the basis sees position-free
  content. (MHA2MLA keeps rotary dimensions uncompressed because it folds the up-projection into the query,
  through which RoPE does not commute; reconstructing first makes that unnecessary.)
- `heads<N>`: KV heads merged down to N per layer (N=1: MQA). RoPE rotates every head's frequency plane f by the
  same angle, so a plane is a complex number z[h, f] and any complex-scalar mix of heads commutes with RoPE. The
  merged head of a group is the top complex principal component of its heads, plane by plane; it is a valid RoPE'd
  key itself (query heads could read it directly, MQA-style). Values: the top N*head_dim principal directions.
- `layers<L>`: only layers < L are stored; attention scoring that reads those layers stops the forward there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvrank.attention.functional import apply_rope
from kvrank.attention.quantize import dequantize, quantize
from kvrank.errors import KvrankError

RopeFn = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]  # (layer, start, n) -> cos, sin [n, D]
Basis = dict[str, torch.Tensor]
_PART = re.compile(r"int(?P<bits>8|4)|rank(?P<rk>\d+)(?::(?P<rv>\d+))?|heads(?P<heads>\d+)|layers(?P<layers>\d+)")
AUTO = "auto"  # the layout recommended for the model, chosen by measurement (store/formats.py; docs/concepts)
GRAMMAR = "'none' or components joined by '+': int8|int4, rank<R>|rank<RK>:<RV>, heads<N>, layers<L>"


@dataclass(frozen=True)
class KVFormat:
    bits: int = 16  # 16: the storage dtype unchanged; 8 or 4: integer codes with fp16 scales
    key_rank: int | None = None  # low-rank latent of the keys (pre-RoPE), per layer over all KV heads
    value_rank: int | None = None
    heads: int | None = None  # KV heads merged down to this many
    layers: int | None = None  # only layers < this are stored

    def __post_init__(self) -> None:
        if self.heads is not None and (self.key_rank is not None or self.value_rank is not None):
            raise KvrankError(f"kv_format {self.name!r}: heads<N> already compresses the keys; drop rank or heads",
                              param="kv_format")
        if (self.key_rank is None) != (self.value_rank is None):
            raise KvrankError("kv_format: give both ranks (rank<R> or rank<RK>:<RV>), not one of them; heads<N> "
                              "sets its own value rank (N * head_dim)", param="kv_format")
        for name in ("key_rank", "value_rank", "heads", "layers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise KvrankError(f"kv_format: {name} must be >= 1, got {getattr(self, name)}", param="kv_format")

    @classmethod
    def parse(cls, name: str) -> KVFormat:
        text = name.strip().lower()
        if text in ("", "none"):
            return cls()
        fields: dict[str, int] = {}
        for part in text.split("+"):
            match = _PART.fullmatch(part)
            if match is None:
                raise KvrankError(f"kv_format {name!r}: cannot read {part!r}; use {GRAMMAR}", param="kv_format")
            found = {k: int(v) for k, v in match.groupdict().items() if v is not None}
            if "rk" in found:
                found = {"key_rank": found["rk"], "value_rank": found.get("rv", found["rk"])}
            if clash := fields.keys() & found.keys():
                raise KvrankError(f"kv_format {name!r} sets {sorted(clash)} twice", param="kv_format")
            fields.update(found)
        return cls(**fields)

    @property
    def name(self) -> str:
        parts = []
        if self.heads is not None:
            parts.append(f"heads{self.heads}")
        if self.key_rank is not None:  # (heads<N> implies its value rank)
            rk, rv = self.key_rank, self.value_rank
            parts.append(f"rank{rk}" if rk == rv else f"rank{rk}:{rv}")
        if self.layers is not None:
            parts.append(f"layers{self.layers}")
        if self.bits != 16:
            parts.append(f"int{self.bits}")
        return "+".join(parts) or "none"

    @property
    def fitted(self) -> bool:
        """Needs projections fitted on calibration passages."""
        return self.key_rank is not None or self.value_rank is not None or self.heads is not None

    @property
    def transforms(self) -> bool:
        """Stored tensors differ from the model's KV in the storage dtype (anything besides layer selection)."""
        return self.fitted or self.bits != 16

    def value_width(self, head_dim: int) -> int | None:
        """Latent width of the values: the value rank, N * head_dim for heads<N>, None when values are kept whole."""
        return self.heads * head_dim if self.heads is not None else self.value_rank

    def check(self, num_layers: int, kv_heads: int, head_dim: int) -> None:
        """Refuse settings this model cannot take, naming the value and the range."""
        width = kv_heads * head_dim
        for name in ("key_rank", "value_rank"):
            rank = getattr(self, name)
            if rank is not None and rank > width:
                raise KvrankError(f"kv_format {self.name!r}: {name} {rank} exceeds kv_heads*head_dim = {width}",
                                  param="kv_format")
            if rank is not None and self.bits == 4 and rank % 2:
                raise KvrankError(f"kv_format {self.name!r}: int4 packs pairs; use an even rank, not {rank}",
                                  param="kv_format")
        if self.heads is not None and (self.heads >= kv_heads or kv_heads % self.heads):
            raise KvrankError(f"kv_format {self.name!r}: heads{self.heads} must divide and be below the model's "
                              f"{kv_heads} KV heads", param="kv_format")
        if self.layers is not None and self.layers > num_layers:
            raise KvrankError(f"kv_format {self.name!r}: layers{self.layers} exceeds the model's {num_layers}",
                              param="kv_format")

    def stored_layers(self, num_layers: int) -> int:
        return min(self.layers or num_layers, num_layers)


# ---------------------------------------------------------------------------------------------- fitting
def _pca(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, W] -> (mean [W], top-`rank` principal directions [W, rank]), both fp32."""
    x = x.double()
    mean = x.mean(dim=0)
    centred = x - mean
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    return mean.float(), vectors[:, -rank:].flip(-1).float().contiguous()


def _planes(k: torch.Tensor) -> torch.Tensor:
    """Rotate-half keys [..., D] as complex RoPE planes [..., D/2]: plane f = (x[f], x[f + D/2])."""
    half = k.shape[-1] // 2
    return torch.complex(k[..., :half].float(), k[..., half:].float())


def _unplanes(z: torch.Tensor) -> torch.Tensor:
    return torch.cat((z.real, z.imag), dim=-1)


def _merge_vectors(z: torch.Tensor, groups: int) -> torch.Tensor:
    """z [Hkv, N, F] complex planes -> unit vectors [Hkv, F, 2] (real, imag): per group and plane, the top
    eigenvector of the heads' Hermitian covariance."""
    hkv, _, f = z.shape
    g = hkv // groups
    zg = z.reshape(groups, g, -1, f).to(torch.complex128).permute(0, 3, 1, 2)  # (G, F, g, N)
    cov = zg @ zg.conj().transpose(-1, -2)  # (G, F, g, g)
    _, vectors = torch.linalg.eigh(cov)
    top = vectors[..., -1]  # (G, F, g)
    u = top.permute(0, 2, 1).reshape(hkv, f)  # (Hkv, F)
    return torch.stack((u.real, u.imag), dim=-1).float()


def fit_basis(fmt: KVFormat, keys: Sequence[Sequence[torch.Tensor]], values: Sequence[Sequence[torch.Tensor]],
              start: int, rope: RopeFn | None) -> Basis:
    """Projections for `fmt` from calibration blocks: `keys[p][l]`, `values[p][l]` are `[kv_heads, T_p, D]`
    (keys post-RoPE at canonical positions start..). Returns fp32 tensors named `<what>.<layer>`."""
    basis: Basis = {}
    hkv, _, d = keys[0][0].shape
    value_rank = fmt.value_width(d)
    for layer in range(fmt.stored_layers(len(keys[0]))):
        if fmt.key_rank is not None:
            assert rope is not None, "low-rank keys need the model's RoPE"
            flat = torch.cat([_flat(_unrotate(kv[layer].float(), rope, layer, start)) for kv in keys])
            basis[f"k_mean.{layer}"], basis[f"k_proj.{layer}"] = _pca(flat, fmt.key_rank)
        if fmt.heads is not None:
            z = torch.cat([_planes(kv[layer]) for kv in keys], dim=1)  # (Hkv, N, D/2)
            basis[f"k_merge.{layer}"] = _merge_vectors(z, fmt.heads)
        if value_rank is not None:
            flat = torch.cat([_flat(vv[layer].float()) for vv in values])
            basis[f"v_mean.{layer}"], basis[f"v_proj.{layer}"] = _pca(flat, value_rank)
    return basis


def scale_names(layer: int) -> tuple[str, str]:
    """The aux entries holding one layer's key and value scales of an integer-coded format."""
    return f"ks.{layer}", f"vs.{layer}"


def _joined_scales(aux: Sequence[dict[str, torch.Tensor]], name: str, lengths: Sequence[int]) -> torch.Tensor:
    """Per-block scales ([*, 1, C] per channel or [*, T, 1] per token) expanded over each block's tokens and
    joined along T."""
    return torch.cat([a[name].expand(a[name].shape[0], n, a[name].shape[-1]) for a, n in zip(aux, lengths)], dim=1)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[Hkv, T, D] -> [T, Hkv*D]."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _unflat(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[T, Hkv*D] -> [Hkv, T, D]."""
    return x.reshape(x.shape[0], hkv, -1).transpose(0, 1)


def _unrotate(k: torch.Tensor, rope: RopeFn, layer: int, start: int) -> torch.Tensor:
    cos, sin = rope(layer, start, k.shape[-2])
    return apply_rope(k, cos, -sin)  # R(-p): RoPE is a rotation, its inverse the opposite angle


# ---------------------------------------------------------------------------------------------- codec
class KVCodec:
    """Encode one block's KV into `fmt`'s stored tensors and decode it back, layer by layer.

    Stored per layer l: `keys[l]`, `values[l]` (model KV `[Hkv, T, D]`, a latent `[1, T, r]` or merged heads
    `[N, T, D]`, as storage-dtype numbers or integer codes) and, for integer codes, fp16 scales `ks.l` / `vs.l`.
    """

    def __init__(self, fmt: KVFormat, storage_dtype: torch.dtype = torch.float16, basis: Basis | None = None,
                 rope: RopeFn | None = None, kv_heads: int = 1, head_dim: int = 1):
        self.fmt = fmt
        self.value_rank = fmt.value_width(head_dim)
        self.storage_dtype = storage_dtype
        self.basis = basis or {}
        self.rope = rope
        self.kv_heads = kv_heads
        if fmt.fitted and not self.basis:
            raise KvrankError(f"kv_format {fmt.name!r} needs projections fitted on calibration passages; pass a basis "
                              "(fit_basis over calibration passages, or a store warmed with this format's)",
                              param="kv_format")
        if fmt.key_rank is not None and rope is None:
            raise ValueError("low-rank keys need the model's RoPE (rope=...)")

    def encode(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
               start: int) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
        """Per-layer model KV [Hkv, T, D] (any float dtype) -> stored keys, values and scales."""
        fmt = self.fmt
        n = fmt.stored_layers(len(keys))
        if not fmt.transforms:
            return ([k.to(self.storage_dtype) for k in keys[:n]], [v.to(self.storage_dtype) for v in values[:n]],
                    {})
        out_k, out_v, aux = [], [], {}
        for layer in range(n):
            k, v = keys[layer].float(), values[layer].float()
            if fmt.key_rank is not None:
                assert self.rope is not None, "a low-rank key format needs the model's RoPE"
                k = self._project(_flat(_unrotate(k, self.rope, layer, start)), "k", layer)  # (1, T, rk)
            elif fmt.heads is not None:
                k = self._merge(k, layer)  # (N, T, D)
            if self.value_rank is not None:
                v = self._project(_flat(v), "v", layer)  # (1, T, rv)
            if fmt.bits == 16:
                out_k.append(k.to(self.storage_dtype))
                out_v.append(v.to(self.storage_dtype))
                continue
            k_scales, v_scales = scale_names(layer)
            k_codes, aux[k_scales] = quantize(k, axis=1, bits=fmt.bits)  # per channel
            v_axis = 1 if self.value_rank is not None else 2  # latents per channel, model values per token
            v_codes, aux[v_scales] = quantize(v, axis=v_axis, bits=fmt.bits)
            out_k.append(k_codes)
            out_v.append(v_codes)
        return out_k, out_v, aux

    @property
    def plain_int8(self) -> bool:
        """Whether stored tensors are the model's KV [Hkv, T, D] as int8 codes with per-channel key and per-token
        value scales and nothing else to undo (no latent, no merged heads): what the fused attn kernel decodes."""
        return self.fmt.bits == 8 and not self.fmt.fitted

    def decode(self, keys: torch.Tensor, values: torch.Tensor, aux: dict[str, torch.Tensor], layer: int,
               start: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's stored tensors -> model KV [Hkv, T, D] (unchanged stored tensors when nothing transforms)."""
        return self.decode_blocks([keys], [values], [aux], layer, start, dtype)

    def decode_blocks(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                      aux: Sequence[dict[str, torch.Tensor]], layer: int, start: int,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Several blocks' stored tensors at one layer -> their model KV concatenated along T, [Hkv, sum T, D].

        Codes, latents and scales are joined first (each block's scales expanded over its own tokens), so a row of
        blocks is dequantised, reconstructed and re-rotated in one batched operation instead of one per block."""
        fmt = self.fmt
        if not fmt.transforms:
            return torch.cat(list(keys), dim=1), torch.cat(list(values), dim=1)
        lengths = [int(k.shape[-2]) for k in keys]
        if fmt.bits != 16:
            k_scales, v_scales = scale_names(layer)
            k = dequantize(torch.cat(list(keys), dim=1), _joined_scales(aux, k_scales, lengths))
            v = dequantize(torch.cat(list(values), dim=1), _joined_scales(aux, v_scales, lengths))
        else:
            k, v = torch.cat(list(keys), dim=1).float(), torch.cat(list(values), dim=1).float()
        if fmt.key_rank is not None:
            k_pre = _unflat(self._reconstruct(k, "k", layer), self.kv_heads)
            assert self.rope is not None, "a low-rank key format needs the model's RoPE"
            tables = [self.rope(layer, start, n) for n in lengths]  # each block at its canonical positions
            cos, sin = torch.cat([c for c, _ in tables]), torch.cat([s for _, s in tables])
            k = apply_rope(k_pre, cos, sin)
        elif fmt.heads is not None:
            k = self._unmerge(k, layer)
        if self.value_rank is not None:
            v = _unflat(self._reconstruct(v, "v", layer), self.kv_heads)
        return k.to(dtype), v.to(dtype)

    def _project(self, x: torch.Tensor, kind: str, layer: int) -> torch.Tensor:
        """[T, W] -> latent [1, T, r]."""
        return ((x - self.basis[f"{kind}_mean.{layer}"]) @ self.basis[f"{kind}_proj.{layer}"])[None]

    def _reconstruct(self, latent: torch.Tensor, kind: str, layer: int) -> torch.Tensor:
        """latent [1, T, r] -> [T, W]."""
        return latent[0] @ self.basis[f"{kind}_proj.{layer}"].T + self.basis[f"{kind}_mean.{layer}"]

    def _vectors(self, layer: int) -> torch.Tensor:
        u = self.basis[f"k_merge.{layer}"]  # (Hkv, F, 2)
        return torch.complex(u[..., 0], u[..., 1])  # (Hkv, F)

    def _merge(self, k: torch.Tensor, layer: int) -> torch.Tensor:
        """Keys [Hkv, T, D] -> merged [N, T, D]: per group and plane, <u, z> over the group's heads."""
        u = self._vectors(layer)
        z = _planes(k) * u.conj()[:, None]  # (Hkv, T, F)
        assert self.fmt.heads is not None  # only a heads<N> format merges
        merged = z.reshape(self.fmt.heads, -1, *z.shape[1:]).sum(dim=1)  # (N, T, F)
        return _unplanes(merged)

    def _unmerge(self, k: torch.Tensor, layer: int) -> torch.Tensor:
        """Merged [N, T, D] -> keys [Hkv, T, D]: each head is its plane weight times the merged plane."""
        u = self._vectors(layer)
        assert self.fmt.heads is not None  # only a heads<N> format merges
        z = _planes(k).repeat_interleave(self.kv_heads // self.fmt.heads, dim=0)  # (Hkv, T, F)
        return _unplanes(z * u[:, None])
