"""Hugging Face BEiT / Data2Vec-vision relative position tables, resampled as transformers does at run time.

``BeitRelativePositionBias.forward`` (and Data2Vec-vision's copy, transformers 4.4x and 5.x) resamples its table
on every call to the grid of the input it is given (``(H // patch, W // patch)``, whatever
``interpolate_pos_encoding`` says): the ``(2h-1)(2w-1)`` position rows are read as an image, **bilinearly**
interpolated (``align_corners=False``, no antialias, in the table's own dtype) to ``(2h'-1, 2w'-1)``, and the
three class rows after them are kept. This is not timm's recipe (:func:`~vitresize.resample.tables.resize_rel_bias`:
offsets on a geometric progression), so a checkpoint converted with it is what the model at the old size computes
for an image of the new size, bit for bit. ``--method timm`` / ``beit`` choose those recipes instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .geometry import Size
from .pos_embed import check_dtype, memory_guard
from .tables import resize_rel_bias

if TYPE_CHECKING:
    from ..plans import ModelPlan, Plan, TensorChange

__all__ = ["hf_rel_bias", "resize_rel_bias_hf"]


def resize_rel_bias_hf(table: torch.Tensor, *, old_grid: Size, new_grid: Size, extra_rows: int = 3) -> torch.Tensor:
    """The table transformers' BEiT builds at run time for a ``new_grid`` input from one made for ``old_grid``.

    Step for step as ``BeitRelativePositionBias.forward``: the position rows are reshaped to
    ``[1, 2w-1, 2h-1, heads]`` (transformers' order: the same as ``(2h-1, 2w-1)`` for the square grids it builds),
    interpolated bilinearly (``align_corners=False``) to ``(2h'-1, 2w'-1)`` in the table's dtype, read back
    row-major, and followed by the ``extra_rows`` class rows, bit for bit.

    Args:
        table: ``[(2h-1)(2w-1) + extra_rows, heads]``.
        old_grid: the grid ``(h, w)`` the table was made for (``config.image_size // config.patch_size``).
        new_grid: the grid to make it for.
        extra_rows: rows after the positions (BEiT's class-to-token, token-to-class, class-to-class).

    Returns:
        ``[(2h'-1)(2w'-1) + extra_rows, heads]`` in the input dtype (the input itself for the same square grid,
        which transformers' interpolation leaves as it is).

    Raises:
        ValueError: the table's shape is not ``old_grid``'s, or its dtype is not a float one.
    """
    check_dtype(table, "the relative position table")
    old_h, old_w = 2 * old_grid[0] - 1, 2 * old_grid[1] - 1
    new_h, new_w = 2 * new_grid[0] - 1, 2 * new_grid[1] - 1
    body = old_h * old_w
    if table.ndim != 2 or table.shape[0] != body + extra_rows:
        raise ValueError(
            f"relative position table of shape {list(table.shape)} is not [{body} + {extra_rows}, heads] "
            f"(a {old_grid[0]}x{old_grid[1]} grid)"
        )
    if tuple(old_grid) == tuple(new_grid) and old_h == old_w:
        return table
    with memory_guard(f"a {list(table.shape)} relative position table"):
        sub = table[:body].reshape(1, old_w, old_h, -1).permute(0, 3, 1, 2)
        new = F.interpolate(sub, size=(new_h, new_w), mode="bilinear")
        new = new.permute(0, 2, 3, 1).reshape(new_h * new_w, -1)
        return torch.cat([new, table[body:]])


def hf_rel_bias(t: torch.Tensor, c: TensorChange, m: ModelPlan, plan: Plan) -> torch.Tensor:
    """The ``hf_rel_bias`` op: a BEiT table over the grid, resampled as transformers does at run time; with
    ``method`` ``timm`` or ``beit``, with that recipe instead (timm's linear, or the original cubic, sampling of
    the geometric offsets), as the same table in a timm checkpoint would be."""
    assert c.spans is not None
    old, new = c.spans
    if plan.method not in ("timm", "beit"):
        return resize_rel_bias_hf(t, old_grid=old, new_grid=new, extra_rows=c.extra_rows)
    return resize_rel_bias(t, old_window=old, new_window=new, extra_rows=c.extra_rows, cubic=plan.method == "beit")
