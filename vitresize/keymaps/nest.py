"""timm NesT (``timm.models.nest``): one position table per level, stored block by block.

``levels.i.pos_embed [1, T_i, N, D_i]``: level i's map (the patch grid halved i times by the pooling between
levels) cut into ``T_i = 4**(L-1-i)`` square blocks (``sqrt(T_i)`` per side) of ``N = block_size**2`` tokens,
``block_size = grid / 2**(L-1)`` the same at every level. Block ``t = block_row * sqrt(T) + block_col`` holds
token ``n = row_in_block * block_size + col_in_block``. The model takes square images whose grid (image / patch)
is a multiple of ``2**(L-1)`` (4 for the three levels of every timm NesT: an image a multiple of 16 at patch 4).

A new grid resamples each level's whole map, never block by block, as NesT's own
``timm.models.nest.resize_pos_embed`` does (deblockify, bicubic without antialias, blockify): the ``nest_table``
op (:mod:`vitresize.resample.nest`). timm's ``checkpoint_filter_fn`` only acts on a legacy layout and never
resizes these tables.

The weights state the source grid (level 0's ``sqrt(T_0) * sqrt(N)``), but a model without a main table gets its
grid from ``--from-img-size`` / ``--from-grid`` (or a config.json); :func:`nest_grid` reads it from the keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import GeometryError, param
from .base import KeyMap, Rule, TensorInfo

__all__ = ["TIMM_NEST", "NestRule", "nest_grid"]

_MAX_LEVELS = 8


def _blocks(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(blocks per side, block size)`` of a ``[1, T, N, D]`` table of square counts, else ``None``."""
    if len(shape) != 4 or shape[0] != 1:
        return None
    t, b = math.isqrt(shape[1]), math.isqrt(shape[2])
    return (t, b) if t > 0 and b > 0 and t * t == shape[1] and b * b == shape[2] else None


@dataclass(frozen=True)
class NestRule(Rule):
    """The table of NesT's level ``level``: it spans the model's (square) grid, of which its level's map is
    ``grid / 2**level``, cut into the table's ``sqrt(T)`` x ``sqrt(T)`` blocks."""

    level: int = 0

    def shape_for(self, shape: tuple[int, ...], size: tuple[int, int], rows: int = 0) -> tuple[int, ...] | None:
        """The table's shape for a model grid of ``size``.

        Raises:
            GeometryError: the level's map does not split into the table's blocks (the grid is not a multiple
                of ``2**level * sqrt(T)``), which NesT cannot build.
        """
        blocks = _blocks(shape)
        if blocks is None:
            return None
        t, _ = blocks
        step = (2**self.level) * t
        if size[0] != size[1] or size[0] % step:
            raise GeometryError(
                f"NesT cuts level {self.level}'s map (the grid / {2**self.level}) into {t}x{t} blocks, so its grid "
                f"(image / patch) must be square and a multiple of {step}, not {size[0]}x{size[1]}; choose "
                f"a square {param('img_size')} that is a multiple of {step} x the patch (at patch 4: of {step * 4})"
            )
        side = size[0] // step
        return (1, shape[1], side * side, shape[3])

    def spans(self, shape: tuple[int, ...], size: tuple[int, int]) -> bool:
        try:
            return self.shape_for(shape, size) == tuple(shape)
        except GeometryError:
            return False

    def square_span(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        return None  # never a window: a table that does not span the grid is refused


def _nest_size(key: str, grid: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    """The grid itself, once it is checked square, with a square patch: NesT takes one int image and patch size."""
    if grid[0] != grid[1] or patch[0] != patch[1]:
        raise GeometryError(
            f"NesT takes square images and patches only (timm: 'Model only handles square inputs'), not a "
            f"{grid[0] * patch[0]}x{grid[1] * patch[1]} image at patch {patch[0]}x{patch[1]}; give a square "
            f"{param('img_size')} (and {param('patch')})"
        )
    return grid


def nest_grid(tensors: Mapping[str, TensorInfo], prefix: str) -> tuple[int, int] | None:
    """The grid a NesT's weights state: level 0's ``sqrt(T_0) * sqrt(N)`` per side (``None``: no such table)."""
    info = tensors.get(prefix + "levels.0.pos_embed")
    blocks = _blocks(info.shape) if info is not None else None
    return None if blocks is None else (blocks[0] * blocks[1], blocks[0] * blocks[1])


TIMM_NEST = KeyMap(
    family="timm-nest",
    pos_embed=None,
    patch_embed="patch_embed.proj.weight",
    tokens=(),
    native_method="deit",  # NesT's resize_pos_embed: bicubic, align_corners=False, no antialias
    markers=(r"levels\.\d+\.transformer_encoder\.",),
    grid=nest_grid,
    fixed_patch="vitresize resamples NesT's block tables for a new image size only",
    rules=tuple(
        NestRule(rf"levels\.{i}\.pos_embed", "nest_table", size=_nest_size, level=i) for i in range(_MAX_LEVELS)
    ),
)
