"""timm vision transformers whose position encoding is convolutional, generated or resampled at run time:
nothing in their weights depends on the image size (or, EfficientFormer, the size cannot change).

NaFlexViT keeps a ``[1, 16, 16, D]`` table (``embeds.pos_embed``) that it resamples at run time to whatever grid
the input has, and a linear patch embedding ``embeds.proj [D, P*P*3]``. EfficientFormer's last stage attends over
a fixed 7x7 grid (``attention_biases [heads, 49]``): the model runs only near the size it was built for.

Twins (``pos_block.N``: CPVT's conditional position encoding, a depthwise conv) embeds every stage with its own
kernel (``patch_embeds.0..3``). XCiT adds Fourier features computed at run time through a 1x1 projection
(``pos_embed.token_projection``) after a stack of stride-2 convolutions (``patch_embed.proj.N.0``).
"""

import math
import re
from collections.abc import Mapping

from .base import KeyMap, TensorInfo


def _xcit_stride(tensors: Mapping[str, TensorInfo], prefix: str) -> int:
    """XCiT's patch: 2 to the number of stride-2 convs in its stem (``patch_embed.proj.N.0``)."""
    rx = re.compile(re.escape(prefix) + r"patch_embed\.proj\.\d+\.0\.weight")
    return int(2 ** sum(1 for k in tensors if rx.fullmatch(k)))


TWINS = KeyMap(
    family="timm-twins",
    pos_embed=None,
    patch_embed="patch_embeds.0.proj.weight",
    tokens=(),
    native_method="timm",
    markers=(r"pos_block\.\d+\.proj\.",),
    scheme="conditional",
    scheme_note="a conditional position encoding (CPVT's depthwise conv, pos_block) that works at any grid",
    fixed_patch="Twins embeds each stage with its own kernel (patch_embeds.0..3), which vitresize does not resize",
)

XCIT = KeyMap(
    family="timm-xcit",
    pos_embed=None,
    patch_embed="patch_embed.proj.0.0.weight",
    tokens=("cls_token",),
    native_method="timm",
    markers=(r"pos_embed\.token_projection\.",),
    untied=(r"pos_embed\.token_projection\.",),
    scheme="sincos",
    scheme_note="Fourier (sin-cos) features computed at run time for any grid, through a 1x1 projection",
    stride=_xcit_stride,
    fixed_patch="XCiT's patch is a stack of stride-2 convolutions (patch_embed.proj.N.0), not one kernel",
)


def _linear_patch(tensors: Mapping[str, TensorInfo], prefix: str) -> int | None:
    """NaFlexViT's patch P, from its linear embedding ``[D, P*P*3]``."""
    info = tensors.get(prefix + "embeds.proj.weight")
    if info is None or len(info.shape) != 2 or info.shape[1] % 3:
        return None
    p = math.isqrt(info.shape[1] // 3)
    return p if p * p * 3 == info.shape[1] else None


NAFLEXVIT = KeyMap(
    family="timm-naflexvit",
    pos_embed=None,
    patch_embed="embeds.proj.weight",
    tokens=("embeds.cls_token", "embeds.reg_token"),
    native_method="timm",
    markers=(r"embeds\.pos_embed$",),
    untied=(r"embeds\.pos_embed$",),
    linear_patch=True,
    stride=_linear_patch,
    scheme="runtime",
    scheme_note="a [1, H, W, D] table (embeds.pos_embed) that NaFlexViT resamples at run time to any grid",
    fixed_patch="NaFlexViT embeds patches with a linear layer (embeds.proj), which vitresize does not resize",
)

EFFICIENTFORMER = KeyMap(
    family="timm-efficientformer",
    pos_embed=None,
    patch_embed="stem.conv1.weight",
    tokens=(),
    native_method="timm",
    markers=(r"stages\.\d+\.blocks\.\d+\.token_mixer\.attention_biases$",),
    untied=(r"stages\.\d+\.blocks\.\d+\.token_mixer\.attention_bias",),
    stride=lambda tensors, prefix: 4,
    scheme="relative",
    scheme_note="attention biases over its last stage's fixed 7x7 grid",
    fixed_grid="its last stage attends over a fixed 7x7 grid (attention_biases [heads, 49]), which timm does not "
    "resize, so it runs only at 193 to 224 px",
    fixed_patch="EfficientFormer's patch is a stem of two stride-2 convolutions (stem.conv1, stem.conv2)",
)
