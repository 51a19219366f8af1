"""Per-family key maps: where each library keeps the position table, the patch kernel and prefix tokens.

Adding a family is one module with a :class:`KeyMap`, one line in :data:`KEYMAPS`, and its name in
:data:`vitresize.options.Family` (a test checks that they match).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import UsageError, param
from .base import Found, KeyMap, TensorInfo, find_in
from .dinov2 import DINOV2
from .hf import HF_CLIP, HF_VIT
from .jax import BIG_VISION, VIT_JAX
from .open_clip import OPEN_CLIP
from .timm import TIMM
from .torchvision import TORCHVISION

__all__ = ["KEYMAPS", "Found", "KeyMap", "TensorInfo", "find_vits"]

# Most specific first: a table matched by two maps (DINOv2's also looks like timm's) goes to the first.
KEYMAPS: dict[str, KeyMap] = {
    km.family: km for km in (DINOV2, TIMM, TORCHVISION, HF_VIT, HF_CLIP, OPEN_CLIP, VIT_JAX, BIG_VISION)
}


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
        f, m = find_in(tensors, km)
        taken = {x.pos_key for x in found}
        found += [x for x in f if x.pos_key not in taken]
        misses += m
    return found, misses
