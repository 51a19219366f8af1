"""What each planned operation (:data:`~vitresize.options.Op`) does to its tensor: one function per op, in
:data:`OPS`. Adding an op is its function here (or in a module of its own) and one line in :data:`OPS`.

Each function takes the source tensor (on the plan's device), its :class:`~vitresize.plans.TensorChange` (old and
new shapes, the grid or window it spans before and after, its layout and kept rows), the
:class:`~vitresize.plans.ModelPlan` it belongs to, and the :class:`~vitresize.plans.Plan`; it returns the new
tensor in the source's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..options import GENERATED_OPS
from .attn_bias import attn_bias
from .hf_tables import hf_rel_bias
from .nest import nest_table
from .patch_embed import resample_patch_embed
from .pos_embed import resample_pos_embed
from .tables import relative_position_index, resize_rel_bias, resize_rel_pos_1d

if TYPE_CHECKING:
    from ..plans import ModelPlan, Plan, TensorChange

__all__ = ["GENERATED", "OPS", "OpFunction", "as_rows", "from_rows"]

OpFunction = Callable[[torch.Tensor, "TensorChange", "ModelPlan", "Plan"], torch.Tensor]


def as_rows(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A position table of ``layout`` as ``[1, rows, D]`` (grid rows in row-major order)."""
    if layout == "LD":
        return t.unsqueeze(0)
    if layout == "1HWD":
        return t.reshape(1, t.shape[1] * t.shape[2], t.shape[3])
    if layout == "1DHW":
        return t.permute(0, 2, 3, 1).reshape(1, t.shape[2] * t.shape[3], t.shape[1])
    return t


def from_rows(t: torch.Tensor, layout: str, grid: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`as_rows` for a table of ``grid``."""
    if layout == "LD":
        return t.squeeze(0)
    if layout == "1HWD":
        return t.reshape(1, grid[0], grid[1], t.shape[-1])
    if layout == "1DHW":
        return t.reshape(1, grid[0], grid[1], t.shape[-1]).permute(0, 3, 1, 2)
    return t


def _pos_embed(t: torch.Tensor, c: TensorChange, m: ModelPlan, plan: Plan) -> torch.Tensor:
    """The model's absolute table, on its grid rows, prefix rows kept (any :data:`PosLayout`)."""
    e = m.embedding
    old, new = c.spans if c.spans is not None else (m.source.grid, m.target.grid)
    layout = c.layout or e.pos_layout
    rows = c.extra_rows if c.spans is not None else e.prefix_rows
    table = resample_pos_embed(
        as_rows(t, layout), old_grid=old, new_grid=new, num_prefix_tokens=rows, convention=plan.pos_convention
    )
    return from_rows(table, layout, new)


def _patch_embed(t: torch.Tensor, c: TensorChange, m: ModelPlan, plan: Plan) -> torch.Tensor:
    """The patch kernel, PI-resized (or interpolated) to the new patch."""
    hwio = m.embedding.patch_layout == "HWIO"
    kernel = t.permute(3, 2, 0, 1) if hwio else t  # HWIO -> OIHW
    new = resample_patch_embed(kernel, m.target.patch, basis=plan.patch_convention, method=plan.patch_method)
    return new.permute(2, 3, 1, 0) if hwio else new


def _rel_bias(t: torch.Tensor, c: TensorChange, m: ModelPlan, plan: Plan) -> torch.Tensor:
    assert c.spans is not None
    layout = "HLL" if len(c.old_shape) == 3 else "LH"
    cubic = plan.method == "beit"  # the original BEiT recipe: a cubic spline where timm samples linearly
    return resize_rel_bias(
        t, old_window=c.spans[0], new_window=c.spans[1], extra_rows=c.extra_rows, layout=layout, cubic=cubic
    )


def _rel_pos_1d(t: torch.Tensor, c: TensorChange, m: ModelPlan, plan: Plan) -> torch.Tensor:
    return resize_rel_pos_1d(t, c.new_shape[0])


def _position_ids(t: torch.Tensor, c: TensorChange, m: ModelPlan, plan: Plan) -> torch.Tensor:
    """A ``[1, rows]`` row counter of the old buffer's dtype."""
    return torch.arange(c.new_shape[1], dtype=t.dtype).reshape(c.new_shape)


def _rel_index(t: torch.Tensor, c: TensorChange, m: ModelPlan, plan: Plan) -> torch.Tensor:
    assert c.spans is not None
    return relative_position_index(c.spans[1], class_token=c.extra_rows > 0, dtype=t.dtype)


OPS: dict[str, OpFunction] = {
    "pos_embed": _pos_embed,
    "abs_table": _pos_embed,
    "patch_embed": _patch_embed,
    "rel_bias": _rel_bias,
    "rel_pos_1d": _rel_pos_1d,
    "position_ids": _position_ids,
    "rel_index": _rel_index,
    "attn_bias": attn_bias,
    "hf_rel_bias": hf_rel_bias,
    "nest_table": nest_table,
}
"""Every op's function: a key for each value of :data:`~vitresize.options.Op` (a test checks)."""

GENERATED = GENERATED_OPS
"""Ops that build their tensor anew: the source is read only for its dtype (no NaN check, no float cast)."""
