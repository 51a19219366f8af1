"""timm vision transformers whose position encoding is convolutional or generated: nothing in their weights
depends on the image size.

Twins (``pos_block.N``: CPVT's conditional position encoding, a depthwise conv) embeds every stage with its own
kernel (``patch_embeds.0..3``). XCiT adds Fourier features computed at run time through a 1x1 projection
(``pos_embed.token_projection``) after a stack of stride-2 convolutions (``patch_embed.proj.N.0``).
"""

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
