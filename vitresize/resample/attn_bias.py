"""LeViT-style attention-bias tables: ``attention_biases [heads, h*w]``, one learned bias per head and per
absolute offset ``(|dy|, |dx|)``, stored row-major (``dy * w + dx``) over the resolution the attention spans
(LeViT's stage resolution, TinyViT's window, EfficientViT-MSRA's window).

Hand-written, because the function that does this lives in timm (a test oracle, not a dependency of vitresize):
:func:`resize_attn_bias` is timm's ``resize_rel_pos_bias_table_levit`` (``timm.layers.pos_embed_rel``), which
timm's TinyViT and EfficientViT-MSRA filters call as ``resize_rel_pos_bias_table_levit(v.T, new.shape[::-1]).T``:
the table as ``[1, heads, h, w]`` images, ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``,
computed in float32 (a float64 table too, as timm's ``.float()``) and cast back. timm's function takes square
tables only; a non-square resolution is the same interpolation to ``(h', w')``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .geometry import Size
from .pos_embed import check_dtype, memory_guard

if TYPE_CHECKING:
    from ..plans import ModelPlan, Plan, TensorChange

__all__ = ["attn_bias", "resize_attn_bias"]


def resize_attn_bias(table: torch.Tensor, *, old: Size, new: Size) -> torch.Tensor:
    """Resample an attention-bias table from one resolution to another, as timm's
    ``resize_rel_pos_bias_table_levit``.

    Args:
        table: ``[heads, h*w]`` for the resolution ``old = (h, w)``.
        old: the resolution the table spans.
        new: the resolution to span.

    Returns:
        ``[heads, h'*w']`` in the input dtype (the input itself when the resolution is the same).

    Raises:
        ValueError: ``table`` is not ``[heads, h*w]``, or not a floating tensor vitresize resamples.
    """
    check_dtype(table, "the attention-bias table")
    if table.dim() != 2 or table.shape[1] != old[0] * old[1]:
        raise ValueError(f"attention biases {list(table.shape)} are not [heads, {old[0]}*{old[1]}]")
    if tuple(old) == tuple(new):
        return table
    heads = table.shape[0]
    with memory_guard(f"a {list(table.shape)} attention-bias table"):
        images = table.float().reshape(1, heads, old[0], old[1])
        resized = F.interpolate(images, size=(new[0], new[1]), mode="bicubic", align_corners=False, antialias=True)
        return resized.reshape(heads, new[0] * new[1]).to(table.dtype)


def attn_bias(t: torch.Tensor, c: TensorChange, m: ModelPlan, plan: Plan) -> torch.Tensor:
    """The ``attn_bias`` op (:data:`~vitresize.resample.ops.OPS`): the table from the resolution it spans to the
    new one (``c.spans``), in timm's LeViT convention whatever the plan's ``--method`` (it is the only one)."""
    assert c.spans is not None
    return resize_attn_bias(t, old=c.spans[0], new=c.spans[1])
