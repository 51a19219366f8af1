"""Per-family key maps: where each library keeps the position table, the patch kernel and prefix tokens.

Adding a family is one module with a :class:`KeyMap`, one line in :data:`KEYMAPS`, and its name in
:data:`vitresize.options.Family` (a test checks that they match).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import UsageError, param
from .base import Found, KeyMap, TensorInfo, find_in
from .beit import TIMM_BEIT
from .crossvit import TIMM_CROSSVIT, TIMM_CROSSVIT_DAGGER
from .dinov2 import DINOV2
from .gcvit_maxvit import TIMM_GCVIT, TIMM_MAXXVIT, TIMM_MAXXVIT_RMLP
from .hf import HF_CLIP, HF_VIT
from .hf_relative import HF_BEIT, HF_SWIN, HF_SWINV2
from .hiera import TIMM_HIERA, TIMM_HIERA_ABSWIN
from .jax import BIG_VISION, VIT_JAX
from .levit import TIMM_LEVIT, TIMM_TINYVIT
from .misc import EFFICIENTFORMER, NAFLEXVIT, TWINS, XCIT
from .mvitv2 import TIMM_MVITV2
from .nest import TIMM_NEST
from .open_clip import OPEN_CLIP
from .pit_visformer import TIMM_PIT, TIMM_VISFORMER
from .rope import TIMM_RELPOS, TIMM_ROPE
from .sam import TIMM_SAM
from .swin import TIMM_SWIN, TIMM_SWINV2
from .timm import TIMM
from .tnt_volo import TIMM_TNT, TIMM_VOLO
from .torchvision import TORCHVISION

__all__ = ["KEYMAPS", "Found", "KeyMap", "TensorInfo", "find_vits"]

# Most specific first: a model matched by two maps (DINOv2's table also looks like timm's, every timm model has
# a patch_embed.proj) goes to the first.
KEYMAPS: dict[str, KeyMap] = {
    km.family: km
    for km in (
        DINOV2,
        TIMM_BEIT,
        TIMM_SWIN,
        TIMM_SWINV2,
        TIMM_TNT,
        TIMM_VOLO,
        TIMM_PIT,
        TIMM_VISFORMER,
        TIMM_NEST,
        TIMM_CROSSVIT,
        TIMM_CROSSVIT_DAGGER,
        TIMM_SAM,
        TIMM_MVITV2,
        TIMM_HIERA_ABSWIN,
        TIMM_HIERA,
        TIMM_LEVIT,
        TIMM_TINYVIT,
        TIMM_GCVIT,
        TIMM_MAXXVIT,
        TIMM_MAXXVIT_RMLP,
        TIMM,
        TIMM_RELPOS,
        TIMM_ROPE,
        TWINS,
        XCIT,
        NAFLEXVIT,
        EFFICIENTFORMER,
        TORCHVISION,
        HF_BEIT,
        HF_SWIN,
        HF_SWINV2,
        HF_VIT,
        HF_CLIP,
        OPEN_CLIP,
        VIT_JAX,
        BIG_VISION,
    )
}


_TABLES = tuple(dict.fromkeys(km.pos_embed for km in KEYMAPS.values() if km.pos_embed is not None))
_KERNELS = tuple(dict.fromkeys(km.patch_embed for km in KEYMAPS.values()))
"""Every family's position-table and patch-kernel names: where both sit under a longer prefix, that is another
model's."""


def find_vits(tensors: Mapping[str, TensorInfo], family: str = "auto") -> tuple[list[Found], list[str]]:
    """Find every ViT of ``family`` (or of any known family for ``"auto"``) in one state dict.

    Returns:
        ``(found, near_misses)`` as :func:`vitresize.keymaps.base.find_in` gives them, over the families tried.
    """
    if family == "auto":
        keymaps = list(KEYMAPS.values())
    elif family in KEYMAPS:
        keymaps = [KEYMAPS[family]]
    else:
        raise UsageError(f"{param('family')} {family!r} is not one of auto, {', '.join(KEYMAPS)}")
    found: list[Found] = []
    misses: list[str] = []
    for km in keymaps:
        f, m = find_in(tensors, km, _TABLES, _KERNELS)
        taken = {x.prefix for x in found}  # one model per prefix: the first (most specific) map that finds it
        found += [x for x in f if x.prefix not in taken]
        misses += m
    return found, misses
