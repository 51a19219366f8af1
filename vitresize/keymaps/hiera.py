"""timm Hiera (``timm.models.hiera``) and Hiera-Det / SAM2's image encoder (``timm.models.hieradet_sam2``).

Hiera (``hiera_*_224``): ``pos_embed [1, H*W, D]``, no prefix rows, in raster order over the token grid
``img / 4``: the stem is a 7x7 conv of stride 4 (padding 3), so the kernel is not the patch; the stride is
``patch_stride``, (4, 4) in every timm model. Told apart from a plain ViT by the projections of its pooling
stages (``blocks.N.proj``). timm's filter does not resize the table (its commented-out code would with
``resample_abs_pos_embed``: bicubic, antialias) and nothing is resampled at run time; timm runs it at image
sides that are multiples of 32 (mask units of 8x8 tokens).

Hiera with ``abs_win_pos_embed`` (``hiera_*_abswin_256``: ``pos_embed [1, D, h, w]`` and ``pos_embed_win``) and
Hiera-Det (``sam2_hiera_*``, ``hieradet_small``: ``pos_embed [1, D, h, w]`` and ``pos_embed_window``): a fixed
global table interpolated at run time to the grid, plus a window table tiled over it; no tensor depends on the
image size.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import KeyMap, TensorInfo

_PATCH = "patch_embed.proj.weight"
_FIXED = "Hiera's patch is a 7x7 stride-4 stem conv (overlapping, padded), not a patchify kernel"


def _stride(tensors: Mapping[str, TensorInfo], prefix: str) -> int | None:
    """Hiera's patch: the stride of its 7x7 stem conv, 4 in every timm model; ``None`` for another kernel."""
    info = tensors.get(prefix + _PATCH)
    return 4 if info is not None and tuple(info.shape[-2:]) == (7, 7) else None


def _runtime_stride(tensors: Mapping[str, TensorInfo], prefix: str) -> int:
    """Hiera abswin's and Hiera-Det's patch: 4, as every timm model's ``patch_stride``."""
    return 4


TIMM_HIERA_ABSWIN = KeyMap(
    family="timm-hiera-abswin",
    pos_embed=None,
    patch_embed=_PATCH,
    tokens=(),
    native_method="timm",
    markers=(r"pos_embed_win(dow)?$",),
    untied=(r"pos_embed$", r"pos_embed_win(dow)?$"),
    scheme="runtime",
    scheme_note=(
        "a fixed global table (pos_embed [1, D, h, w]) that the model interpolates to any grid at run time, "
        "plus a window table (pos_embed_win / pos_embed_window) tiled over it (Hiera abswin, Hiera-Det / SAM2)"
    ),
    stride=_runtime_stride,
    fixed_patch=_FIXED,
)


def _hiera_sizes(grid: tuple[int, int], patch: tuple[int, int], window: tuple[int, int] | None) -> str | None:
    """Hiera's mask units and pooling stages need each side of the image to be a multiple of 32."""
    img = (grid[0] * patch[0], grid[1] * patch[1])
    if img[0] % 32 or img[1] % 32:
        ok = f"{max(32, img[0] // 32 * 32)}x{max(32, img[1] // 32 * 32)}"
        return f"Hiera runs only at image sides that are multiples of 32, not {img[0]}x{img[1]} (e.g. {ok})"
    return None


TIMM_HIERA = KeyMap(
    family="timm-hiera",
    pos_embed="pos_embed",
    patch_embed=_PATCH,
    tokens=(),
    native_method="timm",
    markers=(r"blocks\.\d+\.proj\.weight$",),
    forbids=(r"pos_embed_win",),
    stride=_stride,
    stems=((r"blocks\.\d+\.proj\.weight$", "a strided stem conv and token-pooling stages ({key}), as Hiera has"),),
    fixed_patch=_FIXED,
    check_target=_hiera_sizes,
)
