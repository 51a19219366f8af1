"""NesT's block-wise position tables (``timm.models.nest``): ``[1, T, N, D]``, a level's square map cut into
``T`` blocks of ``N`` tokens. A new size resamples the whole map, as ``timm.models.nest.resize_pos_embed`` does:
deblockify, interpolate (NesT's own convention: bicubic, ``align_corners=False``, no antialias), blockify."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .conventions import Convention
from .pos_embed import resample_pos_embed

if TYPE_CHECKING:
    from ..plans import ModelPlan, Plan, TensorChange

__all__ = ["blockify", "deblockify", "nest_table", "resize_nest_table"]


def deblockify(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, T, N, C]`` blocks -> ``[B, H, W, C]`` map (timm's ``deblockify``)."""
    b, t, _, c = x.shape
    side = math.isqrt(t)
    x = x.reshape(b, side, side, block_size, block_size, c)
    return x.transpose(2, 3).reshape(b, side * block_size, side * block_size, c)


def blockify(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, H, W, C]`` map -> ``[B, T, N, C]`` blocks (timm's ``blockify``)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // block_size, block_size, w // block_size, block_size, c)
    return x.transpose(2, 3).reshape(b, (h // block_size) * (w // block_size), -1, c)


def resize_nest_table(table: torch.Tensor, new_tokens: int, convention: Convention) -> torch.Tensor:
    """Resample a NesT level table ``[1, T, N, D]`` to ``[1, T, new_tokens, D]`` (same block count).

    With NesT's convention (bicubic, no antialias) this is ``timm.models.nest.resize_pos_embed`` bit for bit in
    float32; the map is interpolated in float32 and cast back, as :func:`resample_pos_embed` does.

    Raises:
        ValueError: ``T``, ``N`` or ``new_tokens`` is not a square number.
    """
    if table.ndim != 4 or table.shape[0] != 1:
        raise ValueError(f"expected a NesT table of shape [1, T, N, D], got {list(table.shape)}")
    _, t, n, dim = table.shape
    side, old_b, new_b = math.isqrt(t), math.isqrt(n), math.isqrt(new_tokens)
    if side * side != t or old_b * old_b != n or new_b * new_b != new_tokens:
        raise ValueError(f"a NesT table needs square block and token counts, got {list(table.shape)} -> {new_tokens}")
    old_map, new_map = side * old_b, side * new_b
    rows = deblockify(table, old_b).reshape(1, old_map * old_map, dim)
    out = resample_pos_embed(
        rows, old_grid=(old_map, old_map), new_grid=(new_map, new_map), num_prefix_tokens=0, convention=convention
    )
    return blockify(out.reshape(1, new_map, new_map, dim), new_b)


def nest_table(t: torch.Tensor, c: TensorChange, m: ModelPlan, plan: Plan) -> torch.Tensor:
    """The ``nest_table`` op: a NesT level's table, resampled over its whole map to the change's new shape."""
    return resize_nest_table(t, c.new_shape[2], plan.pos_convention)
