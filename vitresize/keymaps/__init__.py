"""Per-family key maps: where each library keeps the position table, the patch kernel and prefix tokens.

Adding a family is one module with a :class:`KeyMap` and one line in :data:`KEYMAPS`.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import UsageError
from .base import Found, KeyMap, TensorInfo, find_in
from .timm import TIMM
from .torchvision import TORCHVISION

__all__ = ["KEYMAPS", "Found", "KeyMap", "TensorInfo", "find_vits"]

KEYMAPS: dict[str, KeyMap] = {km.family: km for km in (TIMM, TORCHVISION)}


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
        raise UsageError(f"--family {family!r} is not one of auto, {', '.join(KEYMAPS)}")
    found: list[Found] = []
    misses: list[str] = []
    for km in keymaps:
        f, m = find_in(tensors, km)
        found += f
        misses += m
    return found, misses
