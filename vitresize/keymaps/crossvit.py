"""timm CrossViT (``timm.models.crossvit``): two branches, each with its own class token and position table.

Branch 0 cuts the image into 12x12 patches: ``pos_embed_0 [1, 1 + H0*W0, D0]`` (a class row first), the main
table. Branch 1 first resizes the image by ``img_scale[1]`` (``int(side * 224 / 240)`` in every ``*_240`` model)
and cuts that into 16x16 patches: ``pos_embed_1 [1, 1 + H1*W1, D1]``, a rule whose grid is derived from the image.
The ``*_dagger_*`` models embed each branch with three convs (``patch_embed.N.proj.0/2/4``) of total stride 12
and 16 instead of one kernel.

timm sizes each table by ``_compute_num_patches``, ``(H // p * W) // p`` rows, not ``(H // p) * (W // p)``:
where the two differ (224, 384 and 408 on the ``*_240`` models) timm builds a model that cannot run, and
vitresize refuses the size. Multiples of 120 per side (240, 360, 480, ...) are always fine. The ``*_408``
models scale by 384/408, which the keys do not tell apart from 224/240: at their own 408 they are refused (408
is not a size a ``*_240`` model runs at).

timm's filter only renames keys (``pos_embed.0`` -> ``pos_embed_0``); each table is resampled with timm's
``resample_abs_pos_embed`` (bicubic, antialias), class row kept.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import GeometryError, param
from .base import KeyMap, TensorInfo
from .pit_visformer import GridRule

__all__ = ["TIMM_CROSSVIT", "TIMM_CROSSVIT_DAGGER", "crossvit_branch_grid"]

SCALE = 224 / 240
"""``img_scale[1]`` of timm's ``*_240`` CrossViTs, as timm writes it (a float: ``int(side * SCALE)``)."""
PATCH = 16
"""Branch 1's patch in every timm CrossViT."""


def crossvit_branch_grid(img: tuple[int, int], *, convs: bool = False) -> tuple[int, int]:
    """Branch 1's grid for an image of ``img``, as timm builds and runs it.

    Raises:
        GeometryError: timm's row count for the table (``_compute_num_patches``) is not the grid's, or (``convs``:
            a dagger model's stride-4-2-2 stem, which rounds up) the scaled image is not a multiple of 16.
    """
    h, w = int(img[0] * SCALE), int(img[1] * SCALE)
    grid = (h // PATCH, w // PATCH)
    timm_rows = (h // PATCH * w) // PATCH
    uneven = convs and (h % PATCH or w % PATCH)
    if timm_rows != grid[0] * grid[1] or uneven:
        why = (
            f"timm sizes pos_embed_1 for 1 + (H // 16 * W) // 16 = {1 + timm_rows} rows, not the "
            f"{1 + grid[0] * grid[1]} it makes"
            if not uneven
            else "the dagger models' conv stem rounds up where the table's grid rounds down"
        )
        at_408 = (
            "a 408x408 CrossViT is a *_408 model, whose second branch scales by 384/408 (which its weights do not "
            "state): vitresize converts the *_240 models only, and those cannot run at 408x408 either: "
            if img == (408, 408)
            else ""
        )
        raise GeometryError(
            f"{at_408}timm's CrossViT cannot run at a {img[0]}x{img[1]} image: its second branch sees it scaled by "
            f"224/240, {h}x{w}, in 16x16 patches ({grid[0]}x{grid[1]}), and {why}; choose a {param('img_size')} "
            f"whose sides are multiples of 120 (240, 360, 480, ...)"
        )
    return grid


def _size(key: str, grid: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    return crossvit_branch_grid((grid[0] * patch[0], grid[1] * patch[1]))


def _dagger_size(key: str, grid: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    return crossvit_branch_grid((grid[0] * patch[0], grid[1] * patch[1]), convs=True)


def _dagger_stride(tensors: Mapping[str, TensorInfo], prefix: str) -> int | None:
    """Branch 0's stride behind timm's three-conv stem for patch 12 (strides 4, 3, 1)."""
    return 12 if prefix + "patch_embed.0.proj.4.weight" in tensors else None


_FIXED = "CrossViT has two patch embeddings (12 and 16), which vitresize does not resize"

TIMM_CROSSVIT = KeyMap(
    family="timm-crossvit",
    pos_embed="pos_embed_0",
    patch_embed="patch_embed.0.proj.weight",
    tokens=("cls_token_0",),
    native_method="timm",
    markers=(r"patch_embed\.1\.proj\.weight$", r"blocks\.\d+\.fusion\."),
    rules=(GridRule(r"pos_embed_1", "abs_table", layout="1LD", extra_rows=1, size=_size),),
    fixed_patch=_FIXED,
)

TIMM_CROSSVIT_DAGGER = KeyMap(
    family="timm-crossvit-dagger",
    pos_embed="pos_embed_0",
    patch_embed="patch_embed.0.proj.0.weight",
    tokens=("cls_token_0",),
    native_method="timm",
    markers=(r"patch_embed\.1\.proj\.4\.weight$", r"blocks\.\d+\.fusion\."),
    rules=(GridRule(r"pos_embed_1", "abs_table", layout="1LD", extra_rows=1, size=_dagger_size),),
    stride=_dagger_stride,
    fixed_patch=_FIXED,
)
