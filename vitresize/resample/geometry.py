"""Grid geometry: parse sizes, infer the source grid and prefix rows, resolve the target. Pure Python."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import GeometryError, Message, UsageError, param

Size = tuple[int, int]

__all__ = [
    "MAX_SIZE",
    "Geometry",
    "Size",
    "format_size",
    "given_grid",
    "infer_source_grid",
    "parse_size",
    "resolve_target",
]


MAX_SIZE = 2**20
"""The largest side accepted for an image size, a grid or a patch (1048576): far beyond any ViT, and a bound that
keeps a typo (``img_size=10000000000``) from reaching the allocator."""


def _shown(value: object) -> str:
    """``repr(value)`` for a message, cut to 40 characters."""
    try:
        text = repr(value)
    except ValueError:  # an int over sys.get_int_max_str_digits()
        return "(an int too long to show)"
    return text if len(text) <= 40 else text[:37] + "..."


def parse_size(text: str | int | Size, *, option: str = "size") -> Size:
    """Parse ``"384"``, ``"384x512"`` (height x width; also ``X``, the multiplication sign and spaces) or an int/pair
    into ``(h, w)``.

    Only ASCII digits make a size: ``int()`` would also take fullwidth and Arabic-Indic digits, ``"1_000"`` and
    ``"+384"``. From Python, an ``int`` or a pair of ``int`` (not ``bool``). Each side is 1 to :data:`MAX_SIZE`.

    Raises:
        UsageError: not one or two positive integers, or a side over :data:`MAX_SIZE`.
    """
    values: list[object]
    if isinstance(text, str):
        parts = [p.strip() for p in text.strip().lower().replace("×", "x").split("x")]
        if len(parts) == 1:
            parts *= 2
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
            raise UsageError(
                f"{option} {_shown(text)} is not a size; write N or HxW in ASCII digits, e.g. 384 or 384x512"
            )
        if any(len(p.lstrip("0")) > len(str(MAX_SIZE)) for p in parts):  # no int() of a 4000-digit string
            raise UsageError(f"{option} {_shown(text)} is too large; each side is at most {MAX_SIZE} (2**20)")
        values = [int(p) for p in parts]
    elif isinstance(text, int):
        values = [text, text]
    else:
        values = list(text) if isinstance(text, tuple | list) else []
    ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    if len(values) != 2 or len(ints) != 2:
        raise UsageError(
            f"{option} {_shown(text)} is not a size; pass an int, an (h, w) pair of ints, or a string N or HxW"
        )
    h, w = ints
    if h <= 0 or w <= 0:
        raise UsageError(f"{option} {_shown(text)} must be positive; give sizes of at least 1")
    if h > MAX_SIZE or w > MAX_SIZE:
        raise UsageError(f"{option} {_shown(text)} is too large; each side is at most {MAX_SIZE} (2**20)")
    return (h, w)


def format_size(size: Size | None) -> str:
    """``(14, 14)`` -> ``"14x14"``; ``None`` -> ``"?"``."""
    return "?" if size is None else f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class Geometry:
    """A patch grid and the patch size that makes it; the image size is their product."""

    grid: Size
    patch: Size

    @property
    def img_size(self) -> Size:
        return (self.grid[0] * self.patch[0], self.grid[1] * self.patch[1])

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def _divide(img: Size, patch: Size, option: str) -> Size:
    if img[0] % patch[0] or img[1] % patch[1]:
        ok = f"{img[0] // patch[0] * patch[0] or patch[0]}x{img[1] // patch[1] * patch[1] or patch[1]}"
        raise UsageError(
            f"{option} {format_size(img)} is not divisible by the patch size {format_size(patch)}; "
            f"use a multiple of the patch (e.g. {ok}) or another {param('patch')}"
        )
    return (img[0] // patch[0], img[1] // patch[1])


def given_grid(from_grid: Size | None, from_img_size: Size | None, patch: Size) -> tuple[Size | None, str]:
    """The source grid the user gave (``from_grid``, or ``from_img_size`` / ``patch``), and which option gave it.

    Raises:
        UsageError: both are given, or the image is not divisible by the patch.
    """
    if from_grid is not None and from_img_size is not None:
        raise UsageError(f"give either {param('from_grid')} or {param('from_img_size')}, not both")
    if from_grid is not None:
        return from_grid, Message(param("from_grid"))
    if from_img_size is not None:
        return _divide(from_img_size, patch, param("from_img_size")), Message(param("from_img_size"))
    return None, ""


def infer_source_grid(
    *,
    num_rows: int,
    prefix_candidates: tuple[int, ...],
    patch: Size,
    pos_key: str,
    from_grid: Size | None = None,
    from_img_size: Size | None = None,
    hint: Size | None = None,
    hint_from: str = "metadata",
) -> tuple[Size, int, str]:
    """Find the source grid and the number of prefix rows of a position table.

    Args:
        num_rows: rows of the position table (prefix rows + patch tokens).
        prefix_candidates: prefix-row counts the checkpoint's evidence allows, most likely first.
        patch: the source patch size (from the kernel).
        pos_key: the table's key, for messages.
        from_grid: the source grid given by the user.
        from_img_size: the source image size given by the user.
        hint: a grid recorded in the file's metadata or sidecar config; used only when it explains the
            token count.
        hint_from: where ``hint`` comes from, returned as the source.

    Returns:
        ``(grid, prefix_rows, source)`` where ``source`` says where the grid came from.

    Raises:
        GeometryError: no candidate explains the token count, or a non-square grid would have to be guessed.
        UsageError: both ``from_grid`` and ``from_img_size`` are given, or the image is not divisible by the patch.
    """
    given, source = given_grid(from_grid, from_img_size, patch)
    if given is not None:
        for p in prefix_candidates:
            if num_rows - p == given[0] * given[1]:
                return given, p, Message(source)
        rows = " or ".join(f"{given[0] * given[1] + p}" for p in prefix_candidates)
        raise GeometryError(
            f"{pos_key} has {num_rows} rows, but a {format_size(given)} grid ({source}) needs {rows} "
            f"(patches + prefix rows); check {source}"
        )
    if hint is not None:
        for p in prefix_candidates:
            if num_rows - p == hint[0] * hint[1]:
                return hint, p, hint_from
    for p in prefix_candidates:
        n = num_rows - p
        side = math.isqrt(n) if n > 0 else 0
        if side > 0 and side * side == n:
            return (side, side), p, "tokens"
    prefixes = "/".join(str(p) for p in prefix_candidates)
    raise GeometryError(
        f"cannot infer the source grid of {pos_key}: {num_rows} rows minus {prefixes} prefix rows is not a "
        f"square grid; pass {param('from_img_size')} HxW (or {param('from_grid')} HxW) to give the source geometry"
    )


def resolve_target(
    source: Geometry,
    *,
    img_size: Size | None = None,
    patch: Size | None = None,
    grid: Size | None = None,
) -> Geometry:
    """The target geometry from the options: the new grid is ``img_size / patch``.

    ``patch`` alone keeps the source image size; ``grid`` replaces ``img_size`` (and may go with ``patch``).

    Raises:
        UsageError: no target, ``grid`` with ``img_size``, or an image size not divisible by the patch.
    """
    if grid is not None and img_size is not None:
        raise UsageError(
            f"give either {param('grid')} or {param('img_size')}, not both (the grid is image size / patch)"
        )
    if img_size is None and patch is None and grid is None:
        raise UsageError(f"no target given; pass {param('img_size')}, {param('patch')} or {param('grid')}")
    new_patch = patch or source.patch
    if grid is not None:
        return Geometry(grid=grid, patch=new_patch)
    if img_size is not None:
        return Geometry(grid=_divide(img_size, new_patch, param("img_size")), patch=new_patch)
    return Geometry(grid=_divide(source.img_size, new_patch, "the source image size"), patch=new_patch)
