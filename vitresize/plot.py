"""The pictures of vitresize: what a checkpoint's position table and patch kernel look like, before and after.

:func:`draw` writes one figure (PNG, SVG or PDF) with one column per :class:`Picture` (one for ``inspect``,
two for ``convert``'s before/after) and, for ``check``, a last row of :class:`Bars` (how well each conversion
method agrees with the original). Its rows:

* position-embedding similarity, as in the ViT paper (Dosovitskiy et al. 2021, fig. 7 centre): for each grid
  position (i, j), the cosine similarity of its table row to every row, as a small HxW map, tiled as an HxW
  mosaic (at most 8x8 positions, sampled evenly, on grids over 8x8), on one colour bar shared by the columns
  (from the lowest similarity, rounded down to a tenth, to 1);
* the patch kernel's filters: for RGB kernels the first 28 principal components of the flattened filters (fig. 7
  left), each a kh x kw RGB image normalised to [0, 1]; for other channel counts the first 28 filters' channel
  mean, in grey.

matplotlib is an optional extra (``pip install matplotlib``), imported inside :func:`draw` through its object
API (``Figure`` with the Agg canvas): pyplot's global state is never touched. This module takes numpy arrays
only and knows nothing of checkpoints; it is the only one in vitresize that imports matplotlib.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .fidelity.base import require

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Array = npt.NDArray[Any]
    Floats = npt.NDArray[np.float64]

__all__ = [
    "SUFFIXES",
    "Bars",
    "Picture",
    "check_destination",
    "draw",
]

SUFFIXES = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
"""Output suffix (lower case) -> the format matplotlib writes."""

DPI = 110
MAX_POSITIONS = 8
"""At most this many grid rows (and columns) of reference positions are drawn in the similarity mosaic."""
MAX_FILTERS = 28
"""Principal components (or filters) of the patch kernel drawn, as in the ViT paper."""
FILTER_COLUMNS = 7
COLUMN_WIDTH = 5.2
"""Inches per picture column."""
NO_TABLE = "no absolute position table\n(relative / rotary positions)"
NO_KERNEL = "no patch kernel"
INVALID_GREY = (0.55, 0.55, 0.55, 1.0)
HIGHLIGHT_BAND = "#fff1a8"
WHITE = (1.0, 1.0, 1.0)
GREY_GAP = (0.8, 0.87, 0.97)
"""Between greyscale filter tiles: a pale blue, told apart from the tiles' white and grey."""


@dataclass(frozen=True, eq=False)
class Picture:
    """One checkpoint's embeddings to draw (compared by identity: it holds arrays).

    Attributes:
        label: the column's heading, e.g. ``"before: vit.pth, 14x14 grid, patch 16"``.
        table: ``[H, W, D]`` floats, the position table's grid rows (no prefix rows); ``None``: there is none.
        kernel: ``[O, C, kh, kw]`` floats (OIHW), the patch kernel; ``None``: there is none.
    """

    label: str
    table: Array | None
    kernel: Array | None


@dataclass(frozen=True)
class Bars:
    """Per-method agreement for ``check``: one group of bars per label, one bar per metric.

    Attributes:
        labels: the methods, e.g. ``("converted", "reference (timm)", "torchvision")``.
        metrics: metric name -> one value per label, e.g. ``{"top-1 agreement %": (99.0, 98.5, 97.0)}``; a NaN
            value is shown as ``n/a``.
        highlight: index of the label to emphasise (the user's converted checkpoint), or ``None``.
    """

    labels: tuple[str, ...]
    metrics: dict[str, tuple[float, ...]]
    highlight: int | None = None


def draw(out: Path, pictures: Sequence[Picture], *, title: str, bars: Bars | None = None) -> None:
    """Draw ``pictures`` side by side (and ``bars`` below them) and write the figure to ``out`` atomically.

    Args:
        out: the file to write; its suffix picks the format (``.png``, ``.svg`` or ``.pdf``); its folder must
            exist. An existing file is replaced.
        pictures: one column each, in order.
        title: the figure's title.
        bars: the per-method agreement of ``check``, drawn as a last row spanning the columns.

    Raises:
        UsageError: an unsupported suffix, a missing folder, or arrays of the wrong rank.
        MissingDependencyError: matplotlib is not installed.
    """
    fmt = _format_of(out)
    _check_folder(out)
    _check_inputs(pictures, bars)
    figure_cls, canvas_cls = _matplotlib()
    fig = _figure(figure_cls, pictures, title, bars)
    canvas_cls(fig)
    _save(fig, out, fmt)


def check_destination(out: Path) -> None:
    """What :func:`draw` would refuse about ``out`` before anything is drawn (a suffix, a folder, matplotlib
    missing): commands check it first, so that a bad ``--plot`` costs nothing and leaves nothing behind.

    Raises:
        UsageError: an unsupported suffix or a missing folder.
        MissingDependencyError: matplotlib is not installed.
    """
    _format_of(out)
    _check_folder(out)
    _matplotlib()


# ----------------------------------------------------------------------------------------------- checks


def _format_of(out: Path) -> str:
    fmt = SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        names = ", ".join(SUFFIXES)
        got = f"suffix {out.suffix!r}" if out.suffix else "no suffix"
        raise UsageError(f"cannot write a plot to {out} ({got}); give a file name ending in {names}")
    return fmt


def _check_folder(out: Path) -> None:
    if not out.parent.is_dir():
        raise UsageError(f"the folder of the plot {out} does not exist; create {out.parent} first")
    if out.is_dir():
        raise UsageError(f"the plot {out} is a folder; give a file name such as {out / 'plot.png'}")


def _check_inputs(pictures: Sequence[Picture], bars: Bars | None) -> None:
    if not pictures and bars is None:
        raise UsageError("nothing to plot: give at least one picture or the bars")
    for p in pictures:
        if p.table is not None and getattr(p.table, "ndim", None) != 3:
            raise UsageError(f"the position table of {p.label!r} must be [H, W, D], not {_shape(p.table)}")
        if p.kernel is not None and getattr(p.kernel, "ndim", None) != 4:
            raise UsageError(f"the patch kernel of {p.label!r} must be [O, C, kh, kw], not {_shape(p.kernel)}")
    if bars is not None:
        _check_bars(bars)


def _check_bars(bars: Bars) -> None:
    n = len(bars.labels)
    for name, values in bars.metrics.items():
        if len(values) != n:
            raise UsageError(f"bars metric {name!r} has {len(values)} values for {n} labels; give one per label")
    if bars.highlight is not None and not 0 <= bars.highlight < n:
        raise UsageError(f"bars highlight {bars.highlight} is not a label index (0..{n - 1}); give one or None")


def _shape(a: object) -> str:
    shape = getattr(a, "shape", None)
    return "shape " + "x".join(map(str, shape)) if shape is not None else type(a).__name__


def _matplotlib() -> tuple[Any, Any]:
    """matplotlib's ``Figure`` and Agg canvas classes; no pyplot, no global backend switch."""
    require("matplotlib", why="--plot")  # first: a stale submodule in sys.modules must not hide its absence
    figure = require("matplotlib.figure", why="--plot")
    agg = require("matplotlib.backends.backend_agg", why="--plot")
    return figure.Figure, agg.FigureCanvasAgg


def _save(fig: Any, out: Path, fmt: str) -> None:
    """Write through a temp file beside ``out`` (removed on any failure), then ``os.replace`` it."""
    from .formats.atomic import atomic_path

    with atomic_path(out, force=True) as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI, facecolor="white")


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class _Mosaic:
    """The similarity maps of the sampled positions, tiled: ``image`` (NaN in the gaps and where undefined),
    ``invalid`` (cells of a tile whose similarity is undefined: a zero or non-finite row)."""

    image: Floats
    invalid: npt.NDArray[np.bool_]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    grid: tuple[int, int]
    gap: int
    bad_rows: int


def _sample(n: int) -> tuple[int, ...]:
    """At most :data:`MAX_POSITIONS` indices of ``0..n-1``, evenly spread, ends included."""
    import numpy as np

    picks = np.round(np.linspace(0, n - 1, min(n, MAX_POSITIONS))).astype(int)
    return tuple(int(i) for i in np.unique(picks))


def _unit_rows(rows: Floats) -> tuple[Floats, npt.NDArray[np.bool_]]:
    """Rows scaled to unit length, and which rows are usable (finite, not zero); unusable rows become 0."""
    import numpy as np

    valid = np.asarray(np.isfinite(rows).all(axis=1), dtype=np.bool_)
    clean = np.where(valid[:, None], rows, 0.0)
    peak = float(np.abs(clean).max()) if clean.size else 0.0
    if peak > 0:
        clean = clean / peak  # no overflow in the norms of huge values
    norms = np.linalg.norm(clean, axis=1)
    valid &= norms > 0
    return np.where(valid[:, None], clean / np.where(norms > 0, norms, 1.0)[:, None], 0.0), valid


def similarity_mosaic(table: Array) -> _Mosaic:
    """The cosine-similarity mosaic of a ``[H, W, D]`` table (see the module's docstring)."""
    import numpy as np

    h, w, d = table.shape
    flat = np.asarray(table, dtype=np.float64).reshape(h * w, d)
    unit, valid = _unit_rows(flat)
    rows, cols = _sample(h), _sample(w)
    picks = [i * w + j for i in rows for j in cols]
    sims = np.clip(unit[picks] @ unit.T, -1.0, 1.0)
    sims[:, ~valid] = np.nan
    sims[~valid[picks], :] = np.nan
    gap = max(1, round(max(h, w) / 10))
    image = np.full((len(rows) * (h + gap) - gap, len(cols) * (w + gap) - gap), np.nan)
    inside = np.zeros(image.shape, dtype=bool)
    for k, (a, b) in enumerate((a, b) for a in range(len(rows)) for b in range(len(cols))):
        y, x = a * (h + gap), b * (w + gap)
        image[y : y + h, x : x + w] = sims[k].reshape(h, w)
        inside[y : y + h, x : x + w] = True
    invalid = inside & np.isnan(image)
    return _Mosaic(image, invalid, rows, cols, (h, w), gap, int((~valid).sum()))


@dataclass(frozen=True)
class _Tiles:
    """The patch kernel's filters as one RGB image (tiles apart on white, or pale blue for grey tiles), and what
    they show."""

    image: Floats
    caption: str
    count: int


def _normalised(tiles: Floats) -> Floats:
    """Each tile (first axis) scaled to [0, 1] on its own; a constant tile becomes 0.5."""
    import numpy as np

    axes = tuple(range(1, tiles.ndim))
    lo, hi = tiles.min(axis=axes, keepdims=True), tiles.max(axis=axes, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (tiles - lo) / np.where(span > 0, span, 1.0), 0.5)


def _principal_components(filters: Floats) -> Floats:
    """The first :data:`MAX_FILTERS` principal components of ``[n, C, kh, kw]`` filters, as ``[k, C, kh, kw]``;
    empty if there are fewer than two distinct filters."""
    import numpy as np

    n = filters.shape[0]
    flat = filters.reshape(n, -1)
    peak = float(np.abs(flat).max()) if flat.size else 0.0
    if n < 2 or peak == 0:
        return filters[:0]
    centred = flat / peak - (flat / peak).mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    keep = int((s > s[0] * 1e-6).sum()) if s.size and s[0] > 0 else 0
    return vt[: min(keep, MAX_FILTERS)].reshape(-1, *filters.shape[1:])


def _rgb_tiles(kernel: Floats) -> tuple[Floats, str]:
    """``[k, kh, kw, 3]`` tiles of an RGB kernel and a caption: principal components, else the raw filters."""
    comps = _principal_components(kernel)
    if len(comps):
        return comps.transpose(0, 2, 3, 1), f"first {len(comps)} principal components, RGB"
    raw = kernel[:MAX_FILTERS]
    return raw.transpose(0, 2, 3, 1), f"first {len(raw)} filters, RGB (too few for PCA)"


def _grey_tiles(kernel: Floats) -> tuple[Floats, str]:
    """``[k, kh, kw, 3]`` grey tiles of the first filters' channel mean, and a caption."""
    import numpy as np

    mean = kernel[:MAX_FILTERS].mean(axis=1)
    c = kernel.shape[1]
    what = "greyscale (1 channel)" if c == 1 else f"greyscale (mean of {c} channels)"
    return np.repeat(mean[..., None], 3, axis=-1), f"first {len(mean)} filters, {what}"


def kernel_tiles(kernel: Array) -> _Tiles:
    """The patch kernel's filters to draw (see the module's docstring); filters with non-finite weights are left
    out, and the caption says so."""
    import numpy as np

    o, c = kernel.shape[:2]
    weights = np.asarray(kernel, dtype=np.float64)
    finite = np.isfinite(weights.reshape(o, -1)).all(axis=1) if o else np.zeros(0, dtype=bool)
    weights = weights[finite]
    if len(weights) == 0:
        return _Tiles(np.ones((1, 1, 3)), f"no finite filters among {o}", 0)
    tiles, caption = _rgb_tiles(weights) if c == 3 else _grey_tiles(weights)
    if (dropped := o - len(weights)) > 0:
        caption += f"\n({dropped} of {o} filters non-finite, left out)"
    background = WHITE if c == 3 else GREY_GAP  # grey tiles are told apart from white pixels
    return _Tiles(_tile(_normalised(tiles), background), caption, len(tiles))


def _tile(tiles: Floats, background: tuple[float, float, float]) -> Floats:
    """``[k, kh, kw, 3]`` tiles laid out :data:`FILTER_COLUMNS` to a row on ``background``."""
    import numpy as np

    k, kh, kw, _ = tiles.shape
    ncols = min(FILTER_COLUMNS, k)
    nrows = math.ceil(k / ncols)
    gap = max(1, round(max(kh, kw) / 8))
    image = np.empty((nrows * (kh + gap) - gap, ncols * (kw + gap) - gap, 3))
    image[:] = background
    for n in range(k):
        y, x = (n // ncols) * (kh + gap), (n % ncols) * (kw + gap)
        image[y : y + kh, x : x + kw] = tiles[n]
    return image


# ----------------------------------------------------------------------------------------------- figure


def _aspect(image: Floats) -> float:
    """Height over width of an image."""
    return float(image.shape[0]) / max(int(image.shape[1]), 1)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines() or [""])


def _figure(figure_cls: Any, pictures: Sequence[Picture], title: str, bars: Bars | None) -> Any:
    mosaics = [None if p.table is None or 0 in p.table.shape[:2] else similarity_mosaic(p.table) for p in pictures]
    tiles = [None if p.kernel is None or 0 in p.kernel.shape else kernel_tiles(p.kernel) for p in pictures]
    ncols = max(len(pictures), 1)
    labels = [_wrap(p.label, 48) for p in pictures]
    header = 0.25 + 0.22 * max((s.count("\n") + 1 for s in labels), default=1)
    inner = COLUMN_WIDTH * 0.8
    row_a = min(max((inner * _aspect(m.image) for m in mosaics if m), default=2.0), 5.0) + 1.2
    row_b = min(max((inner * _aspect(t.image) for t in tiles if t), default=1.0), 4.0) + 0.9
    heights = [header, max(row_a, 2.2), max(row_b, 1.6)] if pictures else []
    if bars is not None:
        heights.append(1.3 + 0.2 * max(len(bars.labels), 1) * max(len(bars.metrics), 1))
    width = COLUMN_WIDTH * ncols + 1.3 if pictures else 0.0
    width = max(width, 9.0 if bars is not None else 0.0, 6.0)
    fig = figure_cls(figsize=(width, sum(heights) + 0.6), dpi=DPI, layout="constrained")
    fig.get_layout_engine().set(h_pad=0.1)  # inches between rows: a panel's title clear of the x label above
    fig.suptitle(_wrap(title, int(width * 12)), fontsize=14, fontweight="bold")
    grid = fig.add_gridspec(len(heights), ncols, height_ratios=heights)
    if pictures:
        _draw_pictures(fig, grid, pictures, labels, mosaics, tiles)
    if bars is not None:
        _draw_bars(fig.add_subplot(grid[len(heights) - 1, :]), bars)
    return fig


def _draw_pictures(
    fig: Any,
    grid: Any,
    pictures: Sequence[Picture],
    labels: Sequence[str],
    mosaics: Sequence[_Mosaic | None],
    tiles: Sequence[_Tiles | None],
) -> None:
    images, table_axes = [], []
    low = _shared_low(mosaics)
    for col, _picture in enumerate(pictures):
        head = fig.add_subplot(grid[0, col])
        head.axis("off")
        head.text(0.5, 0.5, labels[col], ha="center", va="center", fontsize=12, fontweight="bold")
        ax = fig.add_subplot(grid[1, col])
        mosaic = mosaics[col]
        if mosaic is None:
            _draw_missing(ax, NO_TABLE if pictures[col].table is None else "empty position table")
        else:
            images.append(_draw_table(ax, mosaic, low))
            table_axes.append(ax)
        ax = fig.add_subplot(grid[2, col])
        kernel = tiles[col]
        if kernel is None:
            _draw_missing(ax, NO_KERNEL if pictures[col].kernel is None else "empty patch kernel")
        else:
            _draw_kernel(ax, kernel, pictures[col].kernel)
    if images:
        bar = fig.colorbar(images[0], ax=table_axes, shrink=0.85, aspect=25, pad=0.02)
        shared = " (one scale for the columns)" if len(images) > 1 else ""
        bar.set_label(f"cosine similarity{shared}", fontsize=9)
        bar.ax.tick_params(labelsize=8)


def _draw_missing(ax: Any, text: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("#f4f4f4")
    for spine in ax.spines.values():
        spine.set_color("#bbbbbb")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, color="#555555", transform=ax.transAxes)


def _shared_low(mosaics: Sequence[_Mosaic | None]) -> float:
    """The colour scale's low end, shared by the columns so that before and after compare: the lowest finite
    similarity, rounded down to a tenth (a learned table's similarities are mostly positive: a fixed -1..1
    scale would flatten its structure), -1 at the lowest."""
    import numpy as np

    lows = [float(np.nanmin(m.image)) for m in mosaics if m is not None and np.isfinite(m.image).any()]
    if not lows:
        return -1.0
    return max(-1.0, min(0.9, math.floor(min(lows) * 10) / 10))


def _draw_table(ax: Any, m: _Mosaic, low: float = -1.0) -> Any:
    """The similarity mosaic, with the sampled positions on its axes; returns the image for the colour bar."""
    import numpy as np

    h, w = m.grid
    image = ax.imshow(m.image, cmap="viridis", vmin=low, vmax=1.0, interpolation="nearest")
    if m.invalid.any():
        overlay = np.zeros((*m.invalid.shape, 4))
        overlay[m.invalid] = INVALID_GREY
        ax.imshow(overlay, interpolation="nearest")
    ax.set_facecolor("white")
    ax.set_xticks([b * (w + m.gap) + (w - 1) / 2 for b in range(len(m.cols))], [str(j) for j in m.cols])
    ax.set_yticks([a * (h + m.gap) + (h - 1) / 2 for a in range(len(m.rows))], [str(i) for i in m.rows])
    ax.tick_params(length=0, labelsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)
    sampled = h > len(m.rows) or w > len(m.cols)
    ax.set_xlabel(f"position column j ({_of(len(m.cols), w)})", fontsize=9)
    ax.set_ylabel(f"position row i ({_of(len(m.rows), h)})", fontsize=9)
    lines = [f"position-embedding similarity, {h}x{w} grid"]
    lines.append("tile (i, j): cosine of (i, j) to every position" + (" (sampled)" if sampled else ""))
    if m.bad_rows:
        lines.append(f"grey: {m.bad_rows} zero or non-finite rows")
    ax.set_title("\n".join(lines), fontsize=9.5)
    return image


def _of(shown: int, total: int) -> str:
    return f"all {total}" if shown == total else f"{shown} of {total} sampled"


def _draw_kernel(ax: Any, t: _Tiles, kernel: Array | None) -> None:
    shape = getattr(kernel, "shape", (0, 0, 0, 0))
    ax.imshow(t.image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"patch kernel {shape[2]}x{shape[3]}, {shape[0]} filters\n{t.caption}", fontsize=9.5)


def _draw_bars(ax: Any, bars: Bars) -> None:
    """Grouped horizontal bars: one group per label (top to bottom), one bar per metric, values printed."""
    import numpy as np

    n, names = len(bars.labels), list(bars.metrics)
    height = 0.8 / max(len(names), 1)
    values = np.array([bars.metrics[k] for k in names], dtype=np.float64).reshape(len(names), n)
    finite = values[np.isfinite(values)]
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = max(0.0, float(finite.max())) if finite.size else 1.0
    span = (hi - lo) or 1.0
    if bars.highlight is not None:
        ax.axhspan(bars.highlight - 0.48, bars.highlight + 0.48, color=HIGHLIGHT_BAND, zorder=0)
    colours = [f"C{k % 10}" for k in range(len(names))]
    for k in range(len(names)):
        ys = np.arange(n) - 0.4 + (k + 0.5) * height
        for g in range(n):
            _bar(ax, float(ys[g]), float(values[k, g]), height, colours[k], g == bars.highlight, span)
    ax.set_yticks(range(n), [_wrap(s, 28) for s in bars.labels], fontsize=9)
    if bars.highlight is not None:
        ax.get_yticklabels()[bars.highlight].set_fontweight("bold")
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(lo - (0.12 * span if lo < 0 else 0.0), hi + 0.14 * span)
    ax.axvline(0.0, color="#444444", linewidth=0.8)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_title("agreement with the original, by method" + _highlight_note(bars), fontsize=10.5, pad=24)
    if names:
        patches = require("matplotlib.patches", why="--plot")
        handles = [patches.Patch(color=colour, label=name) for colour, name in zip(colours, names, strict=True)]
        ax.legend(
            handles=handles,
            loc="lower center",
            bbox_to_anchor=(0.5, 1.0),
            ncols=len(names),
            fontsize=8.5,
            frameon=False,
        )


def _number(value: float) -> str:
    """A bar's value as printed: one decimal (99.2), three under 1 (0.985), scientific when huge."""
    size = abs(value)
    return f"{value:.3g}" if size >= 1e5 else f"{value:.1f}" if size >= 1 else f"{value:.3f}"


def _highlight_note(bars: Bars) -> str:
    return "" if bars.highlight is None else f" (highlighted: {bars.labels[bars.highlight]})"


def _bar(ax: Any, y: float, value: float, height: float, colour: str, emphasised: bool, span: float) -> None:
    """One bar with its value printed just past its end (``n/a`` for a non-finite value)."""
    if not math.isfinite(value):
        ax.text(0.01 * span, y, "n/a", va="center", ha="left", fontsize=7.5, color="#777777")
        return
    ax.barh(
        y,
        value,
        height=height * 0.92,
        color=colour,
        alpha=1.0 if emphasised else 0.55,
        edgecolor="black" if emphasised else "none",
        linewidth=1.2 if emphasised else 0.0,
        zorder=2,
    )
    pad = 0.01 * span * (1 if value >= 0 else -1)
    ax.text(
        value + pad,
        y,
        _number(value),
        va="center",
        ha="left" if value >= 0 else "right",
        fontsize=7.5,
        fontweight="bold" if emphasised else "normal",
        zorder=3,
    )
