"""Resample an absolute position table ``[1, prefix + H*W, D]`` to a new grid."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..errors import VitresizeError, param
from .conventions import RESAMPLED_DTYPES, Convention
from .geometry import Size

__all__ = ["check_dtype", "memory_guard", "resample_pos_embed"]


def check_dtype(t: torch.Tensor, what: str) -> None:
    """Refuse a tensor that is not float16, bfloat16, float32 or float64 (interpolating it means nothing).

    Raises:
        ValueError: naming ``what`` and the dtype.
    """
    name = str(t.dtype).removeprefix("torch.")
    if name not in RESAMPLED_DTYPES:
        raise ValueError(f"{what} is {name}; only {', '.join(RESAMPLED_DTYPES)} tensors can be resampled")


@contextmanager
def memory_guard(what: str) -> Iterator[None]:
    """Turn running out of memory (``MemoryError``, torch's out-of-memory errors) into one line.

    Raises:
        VitresizeError: ``out of memory while resampling <what>; ...``.
    """
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError):
        pass
    except RuntimeError as e:  # torch's CPU allocator raises a plain RuntimeError
        if "can't allocate memory" not in str(e) and "not enough memory" not in str(e):
            raise
    else:
        return
    raise VitresizeError(
        f"out of memory while resampling {what}; choose a smaller target, free some memory, or resample on "
        f"another {param('device')}"
    )


def resample_pos_embed(
    posemb: torch.Tensor,
    *,
    old_grid: Size,
    new_grid: Size,
    num_prefix_tokens: int,
    convention: Convention,
) -> torch.Tensor:
    """Resample the grid rows of a position table, keeping the leading prefix rows bit-exact.

    The grid rows are interpolated in float32 and cast back to the input dtype, exactly as
    ``timm.layers.resample_abs_pos_embed`` does (same reshape order, same ``F.interpolate`` call), so the
    result equals timm's (and, with the matching convention, torchvision's or DeiT's) bit for bit in fp32.
    Unlike timm, the grid is never guessed and a non-square source is never skipped as a no-op.

    Args:
        posemb: ``[1, num_prefix_tokens + old_h * old_w, D]``.
        old_grid: the source grid ``(h, w)``; rows are in row-major order (h outer).
        new_grid: the target grid ``(h, w)``.
        num_prefix_tokens: leading rows that are not part of the grid (class, distillation, register tokens).
        convention: the interpolation mode, antialias and align_corners.

    Returns:
        ``[1, num_prefix_tokens + new_h * new_w, D]`` in the input dtype (the input itself when nothing changes).

    Raises:
        ValueError: the table's shape does not match ``old_grid`` and ``num_prefix_tokens``, or its dtype is not
            float16, bfloat16, float32 or float64.
        VitresizeError: out of memory.

    Example:
        >>> import torch
        >>> from vitresize.resample.conventions import METHODS
        >>> pe = torch.zeros(1, 1 + 14 * 14, 8)
        >>> resample_pos_embed(pe, old_grid=(14, 14), new_grid=(24, 24), num_prefix_tokens=1,
        ...                    convention=METHODS["timm"]).shape
        torch.Size([1, 577, 8])
    """
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"expected a position table of shape [1, L, D], got {list(posemb.shape)}")
    check_dtype(posemb, "the position table")
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if posemb.shape[1] != expected:
        raise ValueError(
            f"position table has {posemb.shape[1]} rows, expected {num_prefix_tokens} prefix + "
            f"{old_grid[0]}x{old_grid[1]} grid = {expected}"
        )
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = posemb.shape[-1]
    orig_dtype = posemb.dtype
    work = torch.float64 if convention.float64 else torch.float32
    rows = num_prefix_tokens + new_grid[0] * new_grid[1]
    with memory_guard(f"a {list(posemb.shape)} position table to [1, {rows}, {dim}]"):
        grid = grid.to(work).reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
        grid = _interpolate(grid, old_grid, new_grid, convention)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(orig_dtype)
        if num_prefix_tokens == 0:
            return grid
        return torch.cat([prefix, grid], dim=1)


def _interpolate(grid: torch.Tensor, old_grid: Size, new_grid: Size, convention: Convention) -> torch.Tensor:
    if convention.scale_offset is None:
        return F.interpolate(
            grid,
            size=tuple(new_grid),
            mode=convention.interpolation,
            align_corners=convention.align_corners,
            antialias=convention.antialias,
        )
    # DINOv2's hub code: scale_factor = (new + offset) / old, per axis (in (h, w) order; the hub code passes
    # them as (w, h), the same thing for the square grids it supports).
    off = convention.scale_offset
    scale = ((new_grid[0] + off) / old_grid[0], (new_grid[1] + off) / old_grid[1])
    out = F.interpolate(
        grid,
        scale_factor=scale,
        mode=convention.interpolation,
        align_corners=convention.align_corners,
        antialias=convention.antialias,
    )
    if tuple(out.shape[-2:]) != tuple(new_grid):
        raise ValueError(f"scale_factor interpolation gave a {tuple(out.shape[-2:])} grid, not {tuple(new_grid)}")
    return out
