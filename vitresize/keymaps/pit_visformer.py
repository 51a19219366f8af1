"""timm PiT and Visformer: position tables kept as ``[1, D, H, W]`` grids behind a convolutional patch embedding.

PiT (``timm.models.pit``): ``pos_embed [1, D, H, W]`` over an *overlapping* patch conv
(``patch_embed.conv``: kernel k, stride k / 2, no padding), so its grid is ``(image - k) // (k / 2) + 1`` per
side (224 -> 27 at k 16, pit_ti/xs/s; 31 at k 14, pit_b), not image / patch: no patch turns an image size into
that grid, so a target is given as ``--grid``; the class (and distillation) tokens get no rows. timm's filter
does not resize it (the code is commented out); the convention is timm's ``resample_abs_pos_embed``.

Visformer (``timm.models.visformer``): a 7x7 stride-2 conv stem, then ``patch_embed1`` (kernel = stride
``patch_size // 4``) and ``pos_embed1 [1, D/2, H, W]`` at stride 8; ``patch_embed2`` and ``patch_embed3`` (kernel =
stride ``patch_size // 8``) each floor the grid again, with their own ``pos_embed2 [1, D, H/2, W/2]`` and
``pos_embed3 [1, 2D, H/4, W/4]``. timm has no filter for it; each table is resampled on its own with timm's
``resample_abs_pos_embed`` (bicubic, antialias), to the grid the model builds at the target.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import KeyMap, Rule, TensorInfo
from .stems import square_kernel

__all__ = ["TIMM_PIT", "TIMM_VISFORMER", "GridRule"]


class GridRule(Rule):
    """A rule whose table spans a grid derived from the model's (``size``), never a window: a table that does
    not span the derived source grid is refused, not kept as if it spanned a window that does not change."""

    def square_span(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        return None


def _visformer_stride(tensors: Mapping[str, TensorInfo], prefix: str) -> int | None:
    """The stride of ``pos_embed1``'s grid: ``patch_embed1``'s kernel, times 2 behind the conv stem (``stem.0``)."""
    kernel = square_kernel(tensors.get(prefix + "patch_embed1.proj.weight"))
    if kernel is None:
        return None
    return 2 * kernel if prefix + "stem.0.weight" in tensors else kernel


def _visformer_size(key: str, grid: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    """The grid of ``pos_embed2`` / ``pos_embed3``: ``pos_embed1``'s grid floored by each later patch embedding,
    whose kernel is ``patch_size // 8`` (timm), i.e. a quarter of ``pos_embed1``'s stride."""
    later = int(key[-1]) - 1
    h, w = grid
    for _ in range(later):
        h //= max(patch[0] // 4, 1)
        w //= max(patch[1] // 4, 1)
    return (h, w)


_PIT_STEM = (
    "an overlapping conv (PiT's stride is half its kernel, so the grid is (image - kernel) // stride + 1 per "
    "side: 27x27 at 224, 47x47 at 384, 55x55 at 448 for kernel 16)"
)

TIMM_PIT = KeyMap(
    family="timm-pit",
    pos_embed="pos_embed",
    patch_embed="patch_embed.conv.weight",
    tokens=(),  # cls_token, dist_token: no rows in the table
    native_method="timm",
    pos_layout="1DHW",
    markers=(r"transformers\.\d+\.blocks\.",),
    stems=((r"patch_embed\.conv\.weight$", _PIT_STEM),),
    fixed_patch="PiT's patch conv overlaps (stride = kernel / 2), so its kernel is not a patch vitresize resizes",
)

TIMM_VISFORMER = KeyMap(
    family="timm-visformer",
    pos_embed="pos_embed1",
    patch_embed="patch_embed1.proj.weight",
    tokens=(),
    native_method="timm",
    pos_layout="1DHW",
    markers=(r"stage1\.",),
    rules=(GridRule(r"pos_embed[23]", "abs_table", layout="1DHW", size=_visformer_size),),
    stride=_visformer_stride,
    fixed_patch=(
        "Visformer embeds through a stride-2 conv stem and three patch embeddings (patch_embed1..3), which "
        "vitresize does not resize"
    ),
)
