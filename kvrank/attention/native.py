"""The fused CPU kernel of the `attn` pass (blockmass.c): attention over stored blocks with each block's mass.

`block_mass(q, keys, values)` is a torch custom op (`kvrank::block_mass`) so that FLOP counters and the profiler see
it like any matmul: it does the two attention matmuls of `chunked_mass_attention` over the stored blocks, with the
fp16 -> fp32 conversion, the exponentials and each block's sum done while the block is in cache.

The C source is compiled on first use with the system C compiler (`$CC`, else `cc`) into the kernel cache
(`kvrank.io.cache_root()` / native, default ~/.cache/kvrank/native), keyed by the source's digest, and loaded with
ctypes.
It is used only where it can run: an x86 CPU with AVX2, FMA and F16C, a compiler, and `KVRANK_NATIVE` not set to 0.
Anywhere else (no compiler, ARM, CUDA tensors) `available()` is False and the caller keeps the ATen chunk loop,
which computes the same values.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from kvrank.io import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("blockmass.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared"]
THREADED = ["-fopenmp"]  # dropped where the compiler has no OpenMP (clang without libomp): one thread then
ENABLE = "KVRANK_NATIVE"


class BuildError(OSError):
    """The compiler refused the kernel's source."""


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str, fresh: bool = False) -> Path:
    """The compiled library for this source and these flags, built once (atomically: concurrent first uses each
    build to a temporary name and rename into place); `fresh` builds again over a library that would not load."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + THREADED).encode()).hexdigest()[:16]
    target = cache_root() / "native" / f"blockmass-{digest}.so"
    if target.exists() and not fresh:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        for extra in (THREADED, []):
            result = subprocess.run([compiler, *FLAGS, *extra, str(SOURCE), "-o", str(built), "-lm"],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                break
        else:
            raise BuildError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


def _load(compiler: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(_build(compiler)))
    except BuildError:
        raise
    except OSError:  # a cached library that does not load (truncated, another libc): built again over it
        return ctypes.CDLL(str(_build(compiler, fresh=True)))


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(ENABLE, "1") == "0":
        return None
    if sys.platform != "linux" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.info("native attn kernel not used: it needs Linux on an x86 CPU with AVX2 (this one: %s, %s)",
                 sys.platform, torch.backends.cpu.get_cpu_capability())
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("native attn kernel not used: no C compiler found (set CC, or install gcc); the attn pass runs "
                    "its ATen chunk loop instead")
        return None
    try:
        lib = _load(compiler)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:  # RuntimeError: no home folder for the cache
        log.warning("native attn kernel not used (%s); the attn pass runs its ATen chunk loop instead", err)
        return None
    pointers = ctypes.POINTER(ctypes.c_void_p)
    lib.kvrank_block_mass.restype = ctypes.c_int
    strides = ctypes.POINTER(ctypes.c_int64)
    lib.kvrank_block_mass.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, pointers, pointers,
        strides, strides, pointers, pointers, strides, strides, ctypes.POINTER(ctypes.c_int32), ctypes.c_int,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def available() -> bool:
    """Whether the kernel is compiled and loadable here (compiles it on first call)."""
    return _library() is not None


def loaded() -> bool | None:
    """Whether this process loaded the kernel, without compiling it: None while no `attn` pass has asked for it."""
    return None if _library.cache_info().currsize == 0 else _library() is not None


KINDS = {torch.float32: 0, torch.float16: 1, torch.int8: 2}  # blockmass.c's F32, F16, I8


def _rows_contiguous(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dim() == 3 and t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]


def supports(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
             key_scales: Sequence[torch.Tensor] = (), value_scales: Sequence[torch.Tensor] = ()) -> bool:
    """Whether `block_mass` takes these tensors: fp32 queries [Hkv, R, D] on the CPU with D a multiple of 8; key and
    value blocks [Hkv, T_b, D] of equal shapes and one dtype with contiguous rows: fp32, fp16, or int8 codes with
    kvrank's int8 scales (fp16, [Hkv, 1, D] per channel for keys, [Hkv, T_b, 1] per token for values)."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or q.dim() != 3 or q.shape[-1] % 8 or not keys:
        return False
    hkv, _, d = q.shape
    dtype = keys[0].dtype
    if dtype not in KINDS or len(keys) != len(values) or any(
            k.dtype != dtype or v.dtype != dtype or k.shape != v.shape or k.shape[0] != hkv or k.shape[-1] != d
            or not _rows_contiguous(k) or not _rows_contiguous(v) for k, v in zip(keys, values)):
        return False
    if dtype != torch.int8:
        return not key_scales and not value_scales
    return len(key_scales) == len(value_scales) == len(keys) and all(
        ks.dtype == vs.dtype == torch.float16 and ks.device.type == vs.device.type == "cpu"
        and ks.dim() == vs.dim() == 3 and ks.shape[0] == vs.shape[0] == hkv
        and ks.shape[1] == 1 and ks.shape[2] == d and ks.stride(2) == 1
        and vs.shape[1] == k.shape[1] and vs.shape[2] == 1 and vs.stride(1) == 1
        for k, ks, vs in zip(keys, key_scales, value_scales))


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * max(1, len(tensors)))(*[t.data_ptr() for t in tensors])


def _strides(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_int64 * max(1, len(tensors)))(*[t.stride(0) for t in tensors])


@torch.library.custom_op("kvrank::block_mass", mutates_args=())
def block_mass(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], key_scales: list[torch.Tensor],
               value_scales: list[torch.Tensor], threads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of q [Hkv, R, D] (fp32, scores in log2 units) over blocks keys[b], values[b] [Hkv, T_b, D] (fp32,
    fp16, or int8 codes with `key_scales` / `value_scales` as `supports` says; empty lists otherwise).

    Returns the output [Hkv, R, D] and each block's sum of exponentials [Hkv, R, n_blocks], both unnormalised and
    relative to the returned per-row maximum [Hkv, R, 1]."""
    if not supports(q, keys, values, key_scales, value_scales):
        layouts = sorted({(str(t.dtype), tuple(t.shape), t.stride()[-2:]) for t in keys + values})[:3]
        raise ValueError(f"block_mass takes fp32 CPU queries [Hkv, R, D] with D a multiple of 8 and key and value "
                         f"blocks of equal shapes [Hkv, T_b, D] with contiguous rows, all fp32, all fp16, or all int8 "
                         f"with fp16 scales; got q {q.dtype} {tuple(q.shape)}, {len(keys)} key / {len(values)} value "
                         f"blocks like {layouts} and {len(key_scales)} / {len(value_scales)} scales; call "
                         ".contiguous() on the blocks")
    lib = _library()
    if lib is None:
        raise RuntimeError("kvrank::block_mass called where the native kernel is not available (see the log for why); "
                           "check native.available() first, or set KVRANK_NATIVE=0 to use the ATen loop throughout")
    q = q.contiguous()
    hkv, rows, d = q.shape
    nb = len(keys)
    out = torch.empty((hkv, rows, d), dtype=torch.float32)
    sums = torch.empty((hkv, rows, nb), dtype=torch.float32)
    ref = torch.empty((hkv, rows, 1), dtype=torch.float32)
    lens = (ctypes.c_int32 * nb)(*[k.shape[1] for k in keys])
    failed = lib.kvrank_block_mass(
        q.data_ptr(), hkv, rows, d, nb, KINDS[keys[0].dtype], _pointers(keys), _pointers(values), _strides(keys),
        _strides(values), _pointers(key_scales), _pointers(value_scales), _strides(key_scales),
        _strides(value_scales), lens, threads, out.data_ptr(), sums.data_ptr(), ref.data_ptr())
    if failed:
        raise MemoryError(f"kvrank_block_mass could not allocate its buffers ({nb} blocks of up to "
                          f"{max(lens)} tokens)")
    return out, sums, ref


@block_mass.register_fake
def _(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], key_scales: list[torch.Tensor],
      value_scales: list[torch.Tensor], threads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hkv, rows, d = q.shape
    return q.new_empty((hkv, rows, d)), q.new_empty((hkv, rows, len(keys))), q.new_empty((hkv, rows, 1))


def block_mass_flop(q_shape: torch.Size, keys_shapes: Sequence[torch.Size], *args: object, **kwargs: object) -> int:
    """The kernel's counted FLOPs: the score and the weighted-sum matmul of every row over every stored key."""
    hkv, rows, d = q_shape
    keys = sum(s[1] for s in keys_shapes)
    return 4 * hkv * rows * keys * d
