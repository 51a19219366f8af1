"""What ``--plot`` draws, read from checkpoints: each ViT's position table on its grid and its patch kernel
(:class:`vitresize.plot.Picture`), and ``check``'s per-conversion agreement (:class:`vitresize.plot.Bars`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..api import inspect
from ..formats import open_checkpoint
from ..resample.geometry import format_size

if TYPE_CHECKING:
    from ..options import Family, SizeLike
    from ..plans import Embedding
    from ..plot import Bars, Picture
    from .results import CheckReport

__all__ = ["check_bars", "picture", "plot_check", "plot_checkpoints"]


def _table(e: Embedding, t: Any) -> Any:
    """The position table's grid rows as ``[H, W, D]`` float32 numpy, prefix rows dropped."""
    assert e.source is not None
    h, w = e.source.grid
    t = t.float()
    if e.pos_layout in ("1LD", "LD"):
        t = t.reshape(-1, t.shape[-1])[e.prefix_rows :]
        if t.shape[0] != h * w:
            return None
        return t.reshape(h, w, -1).numpy()
    if e.pos_layout == "1HWD":
        return t.reshape(h, w, -1).numpy()
    return t.reshape(-1, h, w).permute(1, 2, 0).numpy()  # 1DHW


def _kernel(e: Embedding, t: Any) -> Any:
    if t.ndim != 4:
        return None  # a linear patch projection: no square filters to draw
    t = t.float()
    return (t.permute(3, 2, 0, 1) if e.patch_layout == "HWIO" else t).numpy()


def picture(
    path: str | os.PathLike[str],
    label: str,
    *,
    family: Family = "auto",
    from_img_size: SizeLike | None = None,
    from_grid: SizeLike | None = None,
) -> Picture:
    """The first ViT of ``path``: its position table on the grid and its patch kernel, labelled with
    ``label`` and the geometry."""
    from ..plot import Picture

    ins = inspect(path, family=family, from_img_size=from_img_size, from_grid=from_grid)
    if not ins.embeddings:
        return Picture(f"{label}: no ViT found", None, None)
    e = ins.embeddings[0]
    table = kernel = None
    with open_checkpoint(path) as ckpt:
        if e.pos_key is not None and e.source is not None and e.grid_known:
            table = _table(e, ckpt.tensor(e.state_dict, e.pos_key))
        kernel = _kernel(e, ckpt.tensor(e.state_dict, e.patch_key))
    geometry = f"grid {format_size(e.source.grid)}" if e.source is not None and e.grid_known else "grid ?"
    return Picture(f"{label}: {Path(path).name}, {geometry}, patch {format_size(e.kernel)}", table, kernel)


def plot_checkpoints(out: Path, paths: list[tuple[str, str | os.PathLike[str]]], *, title: str, **given: Any) -> None:
    """Draw the checkpoints side by side (one for ``inspect``, before / after for ``convert``)."""
    from ..plot import draw

    draw(out, [picture(path, label, **given) for label, path in paths], title=title)


def check_bars(rep: CheckReport) -> Bars | None:
    """``check``'s conversions as bars: top-1 agreement (where there is a head) and the cosines x 100."""
    from ..plot import Bars

    shown = [c for c in rep.candidates if c.scores is not None]
    if not shown:
        return None
    metrics: dict[str, tuple[float, ...]] = {}
    if all(c.scores is not None and c.scores.top1_agreement is not None for c in shown):
        metrics["top-1 agreement %"] = tuple(c.scores.top1_agreement or 0.0 for c in shown if c.scores)
    metrics["cosine, pooled x100"] = tuple(100 * c.scores.cosine_pooled for c in shown if c.scores)
    metrics["cosine, patches x100"] = tuple(100 * c.scores.cosine_patch for c in shown if c.scores)
    labels = tuple({"converted": "CONVERTED", "reference": "reference (default)"}.get(c.name, c.name) for c in shown)
    return Bars(labels=labels, metrics=metrics, highlight=0)


def plot_check(out: Path, rep: CheckReport, *, family: Family = "auto") -> None:
    """``check``'s picture: the original and the converted side by side (at the geometry ``check`` read), and
    the agreement bars."""
    from ..plot import draw

    o, c = rep.original, rep.converted
    pictures = [
        picture(o.path, "original", family=family, from_grid=o.grid),
        picture(c.path, "converted", family=family, from_grid=c.grid),
    ]
    verdict = "ok" if rep.ok else "FAILED"
    draw(out, pictures, title=f"vitresize check: {verdict} ({rep.images} images)", bars=check_bars(rep))
