"""timm's position-table resampling without importing torch, equal to torch's CPU kernel bit for bit.

Why: ``import torch`` takes ~1.7 s and ~630 MiB here, as long as copying a 4 GB checkpoint, while the
resampling itself is a few milliseconds of arithmetic on one small table. For the convention most checkpoints
use (timm's ``resample_abs_pos_embed``: bicubic, antialiased, to a size, in float32) this module repeats the
operations of torch's CPU kernel (``aten/src/ATen/native/cpu/UpSampleKernel.cpp``, antialiased separable
resampling) one by one in numpy:

* two passes, width first, then height; an axis whose size does not change is skipped;
* per output index ``i`` of an axis (in float32, with the kernel's float/double promotions):
  ``scale = in / out``, ``support = 2 * max(scale, 1)``, ``center = scale * (i + 0.5)``, the taps from
  ``int(center - support + 0.5)`` to ``int(center + support + 0.5)`` clipped to the input, each weighted by
  PIL's cubic (``a = -0.5``) at ``(tap - center + 0.5) / max(scale, 1)``, the weights divided by their sum;
* each output is ``t0 * w0`` plus the other taps' products, added in order.

Where torch's compiler fused a multiply and an add into one FMA, so does this module (an exact float32 FMA,
emulated in float64 with round-to-odd). In the AVX2 and AVX512 builds of the kernel that torch picks on any
x86-64 CPU with AVX2 and FMA, the cubic polynomial is fused, and a sum of ``n`` taps adds
``4 * ((n - 1) // 4)`` products unfused (a vectorized in-order reduction, 4 lanes) and the rest fused (its
scalar tail). In the DEFAULT build (older CPUs, or ``ATEN_CPU_CAPABILITY=default``) nothing is fused.

This was read off torch 2.14 and is checked against ``timm.layers.resample_abs_pos_embed`` by the tests, so it
is only used where it was verified: x86-64 Linux, a verified torch version installed, numpy 2, finite input, a
table of float32, float16 or bfloat16 at least 2 wide. Anywhere else :func:`kernel_variant` or
:func:`resample_pos_table` says no and the caller uses torch.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from .conventions import Convention
    from .geometry import Size

__all__ = ["Table", "kernel_variant", "matches_convention", "resample_pos_table"]

VERIFIED_TORCH = ("2.14.",)
"""torch releases (prefixes of the version) whose kernel this module was checked against."""

_FLOATS = ("float32", "float16", "bfloat16")
_CHANNEL_BLOCK = 256  # channels per block: bounds the float64 temporaries of the FMA emulation


@dataclass(frozen=True)
class Table:
    """A resampled tensor held by numpy: ``data`` (bfloat16 kept as its ``uint16`` bit patterns) and the
    torch name of its dtype; what the safetensors writer needs of a tensor (shape, dtype, bytes)."""

    data: npt.NDArray[np.generic]
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def to_bytes(self) -> memoryview:
        """The little-endian bytes, without a copy (``data`` is C-contiguous)."""
        return memoryview(self.data).cast("B")  # type: ignore[arg-type]


@functools.cache
def kernel_variant() -> str | None:
    """``"fma"`` (torch's AVX2/AVX512 kernels), ``"plain"`` (DEFAULT) or ``None`` (unverified: use torch).

    Decided as torch decides which kernel to run (``ATEN_CPU_CAPABILITY``, else the CPU's flags), without
    importing it; the torch version is read from its package metadata.
    """
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None
    if not version.startswith(VERIFIED_TORCH) or sys.byteorder != "little":
        return None
    import numpy as np

    if int(np.__version__.split(".")[0]) < 2:  # numpy 1's promotion rules differ (NEP 50); not verified
        return None
    wanted = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if wanted == "default":
        return "plain"
    if wanted not in ("", "avx2", "avx512"):
        return None
    flags = _cpu_flags()
    if flags is None:
        return None
    return "fma" if {"avx2", "fma"} <= flags else "plain"


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def matches_convention(conv: Convention) -> bool:
    """Whether ``conv`` is the one this module reproduces: bicubic, antialiased, to a size, float32."""
    return (
        conv.interpolation == "bicubic"
        and conv.antialias
        and not conv.align_corners
        and conv.scale_offset is None
        and not conv.float64
    )


def resample_pos_table(
    raw: bytes,
    dtype: str,
    shape: tuple[int, ...],
    *,
    old_grid: Size,
    new_grid: Size,
    num_prefix_tokens: int,
    variant: str,
) -> Table | None:
    """:func:`vitresize.resample.pos_embed.resample_pos_embed` with timm's convention, from raw bytes.

    Args:
        raw: the table's little-endian bytes, ``[1, L, D]`` or ``[L, D]`` (``L = prefix + h * w``).
        dtype: its torch dtype name.
        shape: its shape.
        old_grid, new_grid, num_prefix_tokens: as for ``resample_pos_embed``.
        variant: :func:`kernel_variant`'s answer.

    Returns:
        The resampled table (prefix rows bit for bit, the same rank as the input), or ``None`` where this
        module does not promise torch's bits (another dtype, non-finite values, a 1-wide table): use torch.
    """
    import numpy as np

    if dtype not in _FLOATS or variant not in ("fma", "plain") or len(shape) not in (2, 3):
        return None
    rows, dim = shape[-2], shape[-1]
    (oh, ow), (nh, nw) = old_grid, new_grid
    if dim < 2 or rows != num_prefix_tokens + oh * ow or (len(shape) == 3 and shape[0] != 1):
        return None
    bits = np.frombuffer(raw, dtype=np.uint16 if dtype != "float32" else np.uint32).reshape(rows, dim)
    values = _to_float32(bits, dtype)
    if not np.isfinite(values).all():
        return None  # torch's NaN/Inf propagation is not modelled; torch also warns about them
    grid = values[num_prefix_tokens:].reshape(oh, ow, dim)
    out = np.empty((nh, nw, dim), np.float32)
    fused = variant == "fma"
    # (axis, its weights), width first as torch does; an axis that keeps its size is skipped
    passes = [
        (axis, _axis_weights(n_in, n_out, fused)) for axis, n_in, n_out in ((1, ow, nw), (0, oh, nh)) if n_in != n_out
    ]
    with np.errstate(all="ignore"):  # an overflow gives Inf as in torch, and is declined below
        for c in range(0, dim, _CHANNEL_BLOCK):
            block = np.ascontiguousarray(grid[:, :, c : c + _CHANNEL_BLOCK])
            for axis, weights in passes:
                block = _resample_axis(block, axis, weights, fused)
            out[:, :, c : c + _CHANNEL_BLOCK] = block
    if not np.isfinite(out).all():
        return None
    table = np.concatenate([bits[:num_prefix_tokens], _from_float32(out.reshape(nh * nw, dim), dtype)])
    return Table(table.reshape((1, *table.shape) if len(shape) == 3 else table.shape), dtype)


def _to_float32(bits: npt.NDArray[np.generic], dtype: str) -> npt.NDArray[np.float32]:
    import numpy as np

    if dtype == "float32":
        return bits.view(np.float32)
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)  # bfloat16: the high half of a float32


def _from_float32(x: npt.NDArray[np.float32], dtype: str) -> npt.NDArray[np.generic]:
    """Round to ``dtype`` as torch does (to nearest, ties to even) and return its bit patterns."""
    import numpy as np

    if dtype == "float32":
        return x.view(np.uint32)
    if dtype == "float16":
        return x.astype(np.float16).view(np.uint16)
    u = x.view(np.uint32)  # c10::BFloat16's round_to_nearest_even (inputs are finite)
    return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)


def _fma(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32], c: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``a * b + c`` rounded once to float32, as an FMA instruction computes it.

    The product of two float32 is exact in float64; the sum is rounded to odd (round to nearest, then, if
    inexact, to the odd neighbour), which makes the final rounding to float32 correct (53 >= 24 + 2 bits).
    """
    import numpy as np

    p = a.astype(np.float64) * b
    c64 = c.astype(np.float64)
    s = p + c64
    v = s - p
    err = (p - (s - v)) + (c64 - v)  # s + err == p + c exactly (2Sum)
    even = (s.view(np.int64) & 1) == 0
    fix = (err != 0) & even
    if fix.any():
        s[fix] = np.nextafter(s[fix], np.where(err[fix] > 0, np.inf, -np.inf))
    return s.astype(np.float32)


def _cubic(x: npt.NDArray[np.float32], fused: bool) -> npt.NDArray[np.float32]:
    """PIL's cubic filter (``a = -0.5``, ``HelperInterpCubic::aa_filter``) in float32, of ``|x|``."""
    import numpy as np

    f32 = np.float32
    a = f32(-0.5)
    x = np.abs(x)
    if fused:
        near = _fma(_fma(np.full_like(x, a + 2), x, np.full_like(x, -(a + 3))) * x, x, np.full_like(x, 1))
        far = _fma(
            _fma(_fma(np.full_like(x, a), x, np.full_like(x, -(5 * a))), x, np.full_like(x, 8 * a)),
            x,
            np.full_like(x, -(4 * a)),
        )
    else:
        near = ((a + 2) * x - (a + 3)) * x * x + f32(1)
        far = ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a
    return np.where(x < 1, near, np.where(x < 2, far, f32(0))).astype(np.float32)


_Weights = tuple["npt.NDArray[np.int64]", "npt.NDArray[np.int64]", "npt.NDArray[np.float32]"]


def _axis_weights(n_in: int, n_out: int, fused: bool) -> _Weights:
    """``(first tap, number of taps, weights [n_out, max taps])`` of one axis, as the kernel computes them
    (``_compute_indices_min_size_weights_aa`` with ``scalar_t = float``)."""
    import numpy as np

    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    support = f32(2.0 * float(scale)) if scale >= 1.0 else f32(2.0)
    max_taps = int(np.ceil(float(support))) * 2 + 1
    invscale = f32(1.0 / float(scale)) if scale >= 1.0 else f32(1.0)
    i = np.arange(n_out, dtype=np.float64)
    center = (float(scale) * (i + 0.5)).astype(np.float32)
    first = np.maximum(np.trunc((center - support).astype(np.float64) + 0.5), 0).astype(np.int64)
    last = np.minimum(np.trunc((center + support).astype(np.float64) + 0.5).astype(np.int64), n_in)
    count = np.clip(last - first, 0, max_taps)
    taps = np.arange(max_taps)
    valid = taps[None, :] < count[:, None]
    pos = (first[:, None] + taps[None, :]).astype(np.float32)
    arg = (((pos - center[:, None]).astype(np.float64) + 0.5) * float(invscale)).astype(np.float32)
    w = np.where(valid, _cubic(arg, fused), f32(0))
    total = np.zeros(n_out, np.float32)
    for j in range(max_taps):  # summed in order, in float32
        total = np.where(valid[:, j], total + w[:, j], total)
    norm = np.where(total[:, None] != 0, w / np.where(total == 0, f32(1), total)[:, None], w)
    return first, count, norm.astype(np.float32)


def _resample_axis(src: npt.NDArray[np.float32], axis: int, weights: _Weights, fused: bool) -> npt.NDArray[np.float32]:
    """Resample ``src`` along ``axis`` with that axis's :func:`_axis_weights` (``interpolate_aa_single_dim``)."""
    import numpy as np

    n_in = src.shape[axis]
    first, count, w = weights
    s = np.moveaxis(src, axis, -1)
    acc = s[..., first] * w[:, 0]
    # Products 1 .. unfused[i] are added unfused (the vectorized part of the reduction), the rest fused.
    unfused = 4 * ((count - 1) // 4) if fused else count
    for j in range(1, w.shape[1]):
        active = count > j
        if not active.any():
            break
        t = s[..., np.minimum(first + j, n_in - 1)]
        wj = np.broadcast_to(w[:, j], t.shape)
        plain = acc + t * wj
        step = np.where(j <= unfused, plain, _fma(t, wj, acc)) if fused else plain
        acc = np.where(active, step, acc)
    return np.ascontiguousarray(np.moveaxis(acc.astype(np.float32), -1, axis))
