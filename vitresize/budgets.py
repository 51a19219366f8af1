"""The size and memory budgets a conversion is held to, unless ``allow_large``: checked on the plan's shapes,
before anything is read, allocated or written. Pure Python.

An output more than :data:`LARGE_RATIO` times the size of its source (and over :data:`LARGE_FLOOR`), or a
resampling that needs more than :data:`MEMORY_CAP` of memory, is far beyond any real ViT's and is what a typo
(``--img-size 100000``) would ask for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .errors import UsageError, param
from .formats._dtypes import nbytes
from .keymaps.base import RELATIVE_OPS

if TYPE_CHECKING:
    from .keymaps import TensorInfo
    from .plans import ModelPlan, TensorChange
    from .resample.conventions import Convention

__all__ = ["LARGE_FLOOR", "LARGE_RATIO", "MEMORY_CAP", "check_output", "check_plan", "format_bytes"]

LARGE_RATIO = 10
"""An output more than this many times the size of its source is refused (unless ``allow_large``) ..."""
LARGE_FLOOR = 16 << 20
"""... once it is over 16 MiB: a toy model of a few kB may grow tenfold for real."""
MEMORY_CAP = 4 << 30
"""Resampled tensors and the working memory of the resampling (float32 copies, the PI-resize matrix and its
pseudo-inverse) are refused above 4 GiB (unless ``allow_large``): far beyond any real ViT's tables (ViT-g at
4096x4096 pixels needs about 2 GiB), and short of what a typo (``--img-size 100000``) would try to allocate."""


def format_bytes(n: int) -> str:
    """``40960`` -> ``"40 KiB"``, ``10**10`` -> ``"9.3 GiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" or size >= 100 else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError  # pragma: no cover


def _working_bytes(c: TensorChange, m: ModelPlan | None, pos_conv: Convention, patch_method: str) -> int:
    """Memory the resampling of ``c`` needs beside its result: float32 (float64) copies, the PI-resize matrix."""
    old, new = math.prod(c.old_shape), math.prod(c.new_shape)
    if c.op == "pos_embed":  # the grid in the working dtype, interpolated, permuted, cast back, concatenated
        return (8 if pos_conv.float64 else 4) * (old + 3 * new) + nbytes(c.new_shape, c.dtype)
    if c.op in RELATIVE_OPS or c.op in ("abs_table", "nest_table"):  # float32 copies, sample points, weights
        return 4 * (old + 3 * new) + 8 * 12 * math.prod(c.new_shape[:2])
    if c.op != "patch_embed" or m is None:
        return 0
    copies = 4 * (old + 2 * new)  # the kernel in float32, the product, its reshape
    if patch_method != "pi":
        return copies
    n_old, n_new = math.prod(m.source.patch), math.prod(m.target.patch)
    # eye(n_old) as n_old images, their resize (B), pinv(B) and the SVD's factors: n_old^2 + about 5 B-sized
    return copies + 4 * (n_old * n_old + 5 * n_new * n_old)


def check_plan(
    models: tuple[ModelPlan, ...],
    changes: tuple[TensorChange, ...],
    src_bytes: int,
    target: str,
    pos_conv: Convention,
    patch_method: str,
) -> None:
    """Refuse a target whose output or memory would be far over any real ViT's (``target`` says it, for messages).

    Raises:
        UsageError: over :data:`LARGE_RATIO` x the source (and :data:`LARGE_FLOOR`), or over :data:`MEMORY_CAP`.
    """
    if not changes:
        return
    owner = {(m.embedding.state_dict, m.embedding.patch_key): m for m in models}
    new = [nbytes(c.new_shape, c.dtype) for c in changes]
    out = src_bytes + sum(new) - sum(nbytes(c.old_shape, c.dtype) for c in changes)
    big = max(range(len(changes)), key=lambda i: new[i])
    c = changes[big]
    if out > max(LARGE_RATIO * src_bytes, LARGE_FLOOR):
        raise UsageError(
            f"{target} would make {c.key} {list(c.new_shape)} ({format_bytes(new[big])}; the output "
            f"{format_bytes(out)}, {out // max(src_bytes, 1)}x the source's {format_bytes(src_bytes)}); "
            f"pass {param('allow_large', True)} if you mean it"
        )
    work = [_working_bytes(c, owner.get((c.state_dict, c.key)), pos_conv, patch_method) for c in changes]
    need = sum(new) + max(work)
    if need > MEMORY_CAP:
        worst = changes[max(range(len(changes)), key=lambda i: work[i])]
        raise UsageError(
            f"{target} would need about {format_bytes(need)} of memory to resample {worst.key} "
            f"{list(worst.old_shape)} -> {list(worst.new_shape)}, over the {format_bytes(MEMORY_CAP)} cap; "
            f"choose a smaller target, or pass {param('allow_large', True)} if you mean it (and have the memory)"
        )


def check_output(
    tensors: Mapping[str, TensorInfo], new_shapes: Mapping[str, tuple[int, ...]], source_bytes: int, name: str
) -> None:
    """Refuse an output that stores every element (``.safetensors``) over :data:`LARGE_RATIO` times its source
    (and over :data:`LARGE_FLOOR`).

    :func:`check_plan` bounds the output from the planned changes. This is the part that depends on the output
    format: a ``.pth`` may hold a broadcast view (``torch.zeros(1).expand(20000, 20000)``) in a few bytes, which
    ``torch.save`` keeps as small, but a ``.safetensors`` file stores every element.

    Raises:
        UsageError: the output would be over the budget.
    """
    sizes = {k: nbytes(new_shapes.get(k, info.shape), info.dtype) for k, info in tensors.items()}
    total = sum(sizes.values())
    if total <= max(LARGE_RATIO * source_bytes, LARGE_FLOOR):
        return
    big = max(sizes, key=lambda k: sizes[k])
    shape = list(new_shapes.get(big, tensors[big].shape))
    raise UsageError(
        f"{name} would hold {format_bytes(total)} of tensors, {total // max(source_bytes, 1)}x the source's "
        f"{format_bytes(source_bytes)} ({big} {shape} alone is {format_bytes(sizes[big])}; a .safetensors file "
        f"stores every element of a broadcast or shared tensor that a .pth keeps once); write a .pth, or pass "
        f"{param('allow_large', True)} if you mean it"
    )
