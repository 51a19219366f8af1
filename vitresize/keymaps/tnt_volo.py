"""timm TNT and VOLO: absolute tables behind a stem whose stride the keys tell.

TNT (``timm.models.tnt``): ``patch_pos [1, 1 + H*W, D]`` (a class row first) over 16x16 patches that a strided
conv (``pixel_embed.proj``, stride 4) cuts into pixels; ``pixel_pos [1, C, P/4, P/4]`` depends on the patch only.
timm's filter resamples ``patch_pos`` with ``resample_abs_pos_embed`` (bicubic, antialias).

VOLO (``timm.models.volo``): ``pos_embed [1, H, W, D]`` at stride 16: a stride-2 conv stem, a ``proj`` of
kernel = stride k (4), and a stride-2 downsampling; no class row. timm has no filter for it; its NHWC resampler
(``resample_abs_pos_embed_nhwc``: bicubic, antialias) is the convention.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from .base import KeyMap, TensorInfo


def _tnt_stride(tensors: Mapping[str, TensorInfo], prefix: str) -> int | None:
    """TNT's patch: 4 (its pixel conv's stride) times the side of ``pixel_pos``."""
    info = tensors.get(prefix + "pixel_pos")
    return 4 * info.shape[-1] if info is not None and len(info.shape) == 4 else None


def _volo_stride(tensors: Mapping[str, TensorInfo], prefix: str) -> int | None:
    """VOLO's table stride: 2 (conv stem) x the ``proj`` kernel x the downsamplings' kernels (``network.N.proj``)."""
    info = tensors.get(prefix + "patch_embed.proj.weight")
    if info is None or len(info.shape) != 4 or info.shape[-1] != info.shape[-2]:
        return None
    rx = re.compile(re.escape(prefix) + r"network\.\d+\.proj\.weight")
    down = math.prod(v.shape[-1] for k, v in tensors.items() if rx.fullmatch(k) and len(v.shape) == 4)
    return 2 * info.shape[-1] * down


TIMM_TNT = KeyMap(
    family="timm-tnt",
    pos_embed="patch_pos",
    patch_embed="pixel_embed.proj.weight",
    tokens=("cls_token",),
    native_method="timm",
    markers=(r"pixel_pos$",),
    untied=(r"pixel_pos$",),
    stride=_tnt_stride,
    fixed_patch="TNT unfolds each patch into pixels (pixel_embed), which vitresize does not resize",
)

TIMM_VOLO = KeyMap(
    family="timm-volo",
    pos_embed="pos_embed",
    patch_embed="patch_embed.proj.weight",
    tokens=(),
    native_method="timm",
    pos_layout="1HWD",
    markers=(r"network\.\d+\.", r"patch_embed\.conv\."),
    stride=_volo_stride,
    fixed_patch="VOLO's patch is a conv stem, a strided kernel and a downsampling, not one kernel",
)
