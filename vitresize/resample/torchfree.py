"""timm's position-table resampling without importing torch, equal to torch's CPU kernel bit for bit.

Why: ``import torch`` takes ~1.7 s and ~630 MiB here, as long as copying a 4 GB checkpoint, while the
resampling itself is a little arithmetic on one small table (~25 ms for ViT-g's, 16x16 -> 28x28). For the
convention most checkpoints use (timm's ``resample_abs_pos_embed``: bicubic, antialiased, to a size, in
float32) this module repeats the operations of torch's CPU kernel (``aten/src/ATen/native/cpu/UpSampleKernel.cpp``,
antialiased separable resampling) one by one in numpy:

* two passes, width first, then height; an axis whose size does not change is skipped;
* per output index ``i`` of an axis (in float32, with the kernel's float/double promotions):
  ``scale = in / out``, ``support = 2 * max(scale, 1)``, ``center = scale * (i + 0.5)``, the taps from
  ``int(center - support + 0.5)`` to ``int(center + support + 0.5)`` clipped to the input, each weighted by
  PIL's cubic (``a = -0.5``) at ``(tap - center + 0.5) / max(scale, 1)``, the weights divided by their sum;
* each output is ``t0 * w0`` plus the other taps' products, added in order.

Where torch's compiler fused a multiply and an add into one FMA, so does this module (an exact float32 FMA,
emulated in float64: the product is exact, and the sum is rounded to odd wherever rounding it to nearest and
then to float32 could round twice). In the AVX2 and AVX512 builds of the kernel that torch picks on any
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
import math
import os
import platform
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from .conventions import Convention
    from .geometry import Size

__all__ = ["Table", "kernel_variant", "matches_convention", "resample_pos_table"]

VERIFIED_TORCH = ("2.14.",)
"""torch releases (prefixes of the version) whose kernel this module was checked against."""

_FLOATS = ("float32", "float16", "bfloat16")
_BLOCK_BYTES = 1 << 20
"""Size of the float64 work arrays of one channel block: ~1 MiB ran fastest (ViT-g 16x16 -> 28x28: 192 channels,
~15% faster than 512; 24x24 -> 16x16: 384, ~10% faster than 128): smaller ones take more numpy calls, larger
ones spill from the 2 MiB L2 cache."""
_INT64_MIN = -(2**63)


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
    importing it; the torch version is read by :func:`_torch_version`.
    """
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    version = _torch_version()
    if version is None or not version.startswith(VERIFIED_TORCH) or sys.byteorder != "little":
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


def _torch_version() -> str | None:
    """The version of the torch that ``import torch`` would import, without importing it; ``None`` if none.

    Read from the ``torch/version.py`` that torch's build writes (``__version__ = '2.14.1+cpu'``), found by
    ``importlib.util.find_spec``: ~0.1 ms, where ``importlib.metadata.version`` took ~15 ms here (~12 ms of it
    importing ``importlib.metadata``, which nothing else on a conversion's path imports). The metadata is
    the fallback where that file is missing or unreadable.
    """
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or ():
        try:
            lines = Path(folder, "version.py").read_bytes().splitlines()
        except OSError:
            continue
        for line in lines:
            name, eq, value = line.partition(b"=")
            if eq and name.partition(b":")[0].strip() == b"__version__":  # (maybe annotated)
                version = value.strip().strip(b"'\"").decode("ascii", "replace")
                if version:
                    return version
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


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
    if not _all_finite(values):
        return None  # torch's NaN/Inf propagation is not modelled; torch also warns about them
    grid = values[num_prefix_tokens:].reshape(oh, ow, dim)
    fused = variant == "fma"
    width = _axis_plan(ow, nw, fused) if ow != nw else None
    height = _axis_plan(oh, nh, fused) if oh != nh else None
    table = np.empty((num_prefix_tokens + nh * nw, dim), bits.dtype)
    table[:num_prefix_tokens] = bits[:num_prefix_tokens]
    out = table[num_prefix_tokens:].reshape(nh, nw, dim)
    scratch = _Scratch()
    # the least spacing of the weights' products (see _resample_block); 0: no fused sums, nothing to check
    weights = math.prod(min(_least_spacing(g.w32) for g in plan) for plan in (width, height) if plan) if fused else 0.0
    step = _channels_per_block(width, height, oh, nw)
    with np.errstate(all="ignore"):  # an overflow gives Inf as in torch, and is declined
        for c in range(0, dim, step):
            block = _resample_block(grid[:, :, c : c + step], width, height, scratch, weights)
            if not _all_finite(block):
                return None
            out[:, :, c : c + step] = _from_float32(block, dtype)
    return Table(table.reshape((1, *table.shape) if len(shape) == 3 else table.shape), dtype)


def _channels_per_block(width: list[_Group] | None, height: list[_Group] | None, oh: int, nw: int) -> int:
    """Channels per block that make the largest float64 work array about ``_BLOCK_BYTES`` (a multiple of 32)."""
    values = 1  # per channel: a group's outputs times the other axis (the old height, then the new width)
    if width:
        values = max(values, max(g.size for g in width) * oh)
    if height:
        values = max(values, max(g.size for g in height) * nw)
    return max(32, _BLOCK_BYTES // (8 * values) // 32 * 32)


def _least_spacing(x: npt.NDArray[np.float32], scratch: _Scratch | None = None) -> float:
    """A power of two that all values of ``x`` are multiples of (``inf`` where all are 0): the spacing of
    float32 values of at least ``m`` (the least nonzero ``|x|``) is at least ``m * 2**-24``."""
    import numpy as np

    a = np.abs(x, out=scratch.get("abs", x.shape, np.float32) if scratch else None)
    least = float(a.min()) if a.size else 0.0
    if least == 0:  # (skipping the zeros costs ~3x as much)
        least = float(a.min(where=a > 0, initial=np.inf))
    return math.ldexp(1.0, math.frexp(least)[1] - 24) if least < math.inf else math.inf


def _all_finite(x: npt.NDArray[np.float32]) -> bool:
    """No NaN or Inf in ``x`` (``min`` and ``max`` propagate NaN; two reductions, no temporary)."""
    import numpy as np

    return x.size == 0 or bool(np.isfinite(x.min()) and np.isfinite(x.max()))


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
    """``a * b + c`` rounded once to float32, as an FMA instruction computes it: the product of two float32 is
    exact in float64, and the sum is rounded to odd (:func:`_round_to_odd`)."""
    import numpy as np

    p = a.astype(np.float64) * b
    s = p + c
    _round_to_odd(p, c, s)
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


@dataclass(frozen=True)
class _Group:
    """The outputs of one axis that sum the same number of taps, hence do the same operations.

    ``rows``: those outputs (a slice where contiguous); ``taps``: their input indices, ``[taps, outputs]``;
    ``w32``/``w64``: their weights, ``[taps, outputs, 1, 1]``; ``unfused``: products ``1 .. unfused`` are
    added in float32, the later ones fused.
    """

    rows: slice | npt.NDArray[np.intp]
    taps: npt.NDArray[np.intp]
    w32: npt.NDArray[np.float32]
    w64: npt.NDArray[np.float64]
    unfused: int

    @property
    def size(self) -> int:
        return int(self.taps.shape[1])


def _axis_plan(n_in: int, n_out: int, fused: bool) -> list[_Group]:
    """One axis's :func:`_axis_weights`, grouped by number of taps (so that no output needs a mask)."""
    import numpy as np

    first, count, w = _axis_weights(n_in, n_out, fused)
    groups = []
    for n in sorted(set(count.tolist())):  # (np.unique would import numpy.ma: ~10 ms)
        rows = np.flatnonzero(count == n)
        taps = max(n, 1)  # (no output has 0 taps; the kernel would read tap 0 with weight 0)
        wg = np.ascontiguousarray(w[rows, :taps].T)[:, :, None, None]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        groups.append(
            _Group(
                rows=slice(lo, hi) if hi - lo == len(rows) else rows,
                taps=np.ascontiguousarray((first[rows, None] + np.arange(taps)).T, dtype=np.intp),
                w32=wg,
                w64=wg.astype(np.float64),
                unfused=4 * ((n - 1) // 4) if fused else n - 1,
            )
        )
    return groups


class _Scratch:
    """Reusable work arrays, one per name: fresh large arrays cost page faults on every channel block."""

    def __init__(self) -> None:
        self._bufs: dict[str, npt.NDArray[np.generic]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type[np.generic]) -> npt.NDArray[Any]:
        import numpy as np

        size = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self._bufs[name] = np.empty(size, dtype)
        return buf[:size].reshape(shape)


def _resample_block(
    grid: npt.NDArray[np.float32],
    width: list[_Group] | None,
    height: list[_Group] | None,
    scratch: _Scratch,
    weights: float,
) -> npt.NDArray[np.float32]:
    """Resample a ``[h, w, channels]`` block, width first, then height, as the kernel does.

    Each pass resamples axis 0 of a contiguous ``[n, rows, channels]`` array (the width pass of the transposed
    block), so that a weight is one number for ``rows * channels`` contiguous values.

    Every product, sum and rounded sum of both passes is a multiple of the input's least spacing times
    ``weights`` (the weights' least spacings multiplied; 0 without fused sums), so where that is at least
    ``2**-126``, no nonzero float64 sum of the FMA emulation is a float32 subnormal (``normal``, :func:`_fma_into`).
    """
    import numpy as np

    normal = False
    if width is not None:
        src = scratch.get("width in", (grid.shape[1], grid.shape[0], grid.shape[2]), np.float32)
        np.copyto(src, grid.transpose(1, 0, 2))
        normal = weights > 0 and _least_spacing(src, scratch) * weights >= 2.0**-126
        grid = _resample_rows(src, width, scratch, "width out", normal).transpose(1, 0, 2)
    if height is not None:
        src = scratch.get("height in", grid.shape, np.float32)
        np.copyto(src, grid)
        if width is None:
            normal = weights > 0 and _least_spacing(src, scratch) * weights >= 2.0**-126
        grid = _resample_rows(src, height, scratch, "height out", normal)
    return grid


def _resample_rows(
    src: npt.NDArray[np.float32], groups: list[_Group], scratch: _Scratch, name: str, normal: bool
) -> npt.NDArray[np.float32]:
    """Resample axis 0 of ``src`` (``interpolate_aa_single_dim``): ``t0 * w0`` plus each later product, in
    order, in float32; the products after ``unfused`` fused into the sum (:func:`_fma_into`)."""
    import numpy as np

    rest = src.shape[1:]
    dst = scratch.get(name, (sum(g.size for g in groups), *rest), np.float32)
    fused_rows = sum((len(g.taps) - 1 - g.unfused) * g.size for g in groups)
    src64 = src
    if fused_rows > 2 * len(src):  # then converting the input to float64 once beats converting each tap:
        src64 = scratch.get("src64", src.shape, np.float64)  # 16x16 -> 28x28: 76 vs 16 rows, ~10% faster;
        np.copyto(src64, src)  # 24x24 -> 16x16: 20 vs 24 rows, ~10% slower (a first call: ~20%)
    for g in groups:
        shape = (g.size, *rest)
        acc = dst[g.rows] if isinstance(g.rows, slice) else scratch.get("acc", shape, np.float32)
        tap = scratch.get("tap", shape, np.float32)
        src.take(g.taps[0], axis=0, out=acc, mode="clip")  # (no index is clipped)
        np.multiply(acc, g.w32[0], out=acc)
        for j in range(1, g.unfused + 1):
            src.take(g.taps[j], axis=0, out=tap, mode="clip")
            np.multiply(tap, g.w32[j], out=tap)
            np.add(acc, tap, out=acc)
        if len(g.taps) > g.unfused + 1:
            total = scratch.get("total", shape, np.float64)
            acc64 = scratch.get("acc64", shape, np.float64)
            for j in range(g.unfused + 1, len(g.taps)):
                np.copyto(acc64, acc)
                _fma_into(src64, g.taps[j], g.w64[j], acc, tap, total, acc64, normal)
        if not isinstance(g.rows, slice):
            dst[g.rows] = acc
    return dst


def _fma_into(
    src: npt.NDArray[np.floating[Any]],
    taps: npt.NDArray[np.intp],
    w: npt.NDArray[np.float64],
    acc: npt.NDArray[np.float32],
    tap: npt.NDArray[np.float32],
    s: npt.NDArray[np.float64],
    acc64: npt.NDArray[np.float64],
    normal: bool,
) -> None:
    """``acc = src[taps] * w + acc`` rounded once to float32 (an FMA per value; ``src`` has float32 values, in
    float32 or float64); ``acc64`` holds ``acc`` in float64, ``tap`` and ``s`` are scratch space (all three
    overwritten).

    The product is exact in float64 (24 + 24 bits <= 53), and rounding the float64 sum to float32 errs only
    where that sum is exactly halfway between two float32: only those are checked (2Sum) and, if inexact, moved
    towards the exact sum (:func:`_round_to_odd`). Halfway between two normal float32, the low 29 bits of the
    float64 are ``1 << 28``; halfway between two subnormal ones (spaced ``2**-149``) more low bits are 0, so
    unless the sums are known to stay normal (``normal``), all with their low 28 bits 0 are checked. Doing the
    2Sum everywhere took 0.14 s for a ViT-g table (257x1536, 16x16 -> 28x28), this ~0.025 s.
    """
    import numpy as np

    if src.dtype == np.float64:
        src.take(taps, axis=0, out=s, mode="clip")  # (no index is clipped)
        np.multiply(s, w, out=s)
    else:
        src.take(taps, axis=0, out=tap, mode="clip")
        np.multiply(tap, w, out=s)
    np.add(s, acc64, out=s)
    low = acc64.view(np.int64).reshape(len(s), -1)
    if normal:  # the low 29 bits, shifted to the top: 1 << 28 becomes the least int64
        np.left_shift(s.view(np.int64).reshape(low.shape), 35, out=low)
        halfway = _INT64_MIN
    else:
        np.bitwise_and(s.view(np.int64).reshape(low.shape), 0x0FFFFFFF, out=low)
        halfway = 0
    rows = np.flatnonzero(low.min(axis=1) == halfway)  # mostly outputs with short weights (9/16, -1/16)
    if rows.size:
        _round_to_odd_where(src, taps, w, acc, s, low, halfway, rows)
    np.copyto(acc, s, casting="same_kind")


def _round_to_odd_where(
    src: npt.NDArray[np.floating[Any]],
    taps: npt.NDArray[np.intp],
    w: npt.NDArray[np.float64],
    acc: npt.NDArray[np.float32],
    s: npt.NDArray[np.float64],
    low: npt.NDArray[np.int64],
    halfway: int,
    rows: npt.NDArray[np.intp],
) -> None:
    """:func:`_fma_into`'s fix-up of ``s`` where ``low == halfway`` (``[outputs, values]``), all in the outputs
    ``rows``: whole outputs where they are few (fewer numpy calls), else the values one by one (less work)."""
    import numpy as np

    if rows.size * 4 <= len(s):
        sr = s[rows]
        if _round_to_odd(src[taps[rows]] * w[rows], acc[rows], sr):
            s[rows] = sr
        return
    n = low.shape[1]
    at = np.flatnonzero(low == halfway)
    r = at // n
    sf = s.reshape(-1)
    sa = sf[at]
    if _round_to_odd(src.reshape(len(src), -1)[taps[r], at - r * n] * w.reshape(-1)[r], acc.reshape(-1)[at], sa):
        sf[at] = sa


def _round_to_odd(p: npt.NDArray[np.float64], c: npt.NDArray[np.floating[Any]], s: npt.NDArray[np.float64]) -> bool:
    """Round ``s = p + c`` (to nearest, in float64) to odd instead: if inexact, to the odd neighbour. That makes
    the final rounding to float32 correct (53 >= 24 + 2 bits) for an exact product ``p``. Whether ``s`` changed.
    """
    import numpy as np

    v = s - p
    err = p - (s - v)
    err += c - v  # s + err == p + c exactly (2Sum)
    if not err.any():
        return False
    fix = (err != 0) & ((s.view(np.int64) & 1) == 0)
    if not fix.any():
        return False
    s[fix] = np.nextafter(s[fix], np.where(err[fix] > 0, np.inf, -np.inf))
    return True
