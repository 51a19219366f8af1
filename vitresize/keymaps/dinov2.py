"""Original DINOv2 checkpoints (facebookresearch/dinov2 hub ``.pth``).

The timm-like layout (``pos_embed [1, 1 + H*W, D]``, ``patch_embed.proj.weight``, ``cls_token``) plus
``mask_token [1, D]``, which tells them apart from timm; ``register_tokens [1, R, D]`` (the ``_reg`` models)
live outside the table. The hub's interpolation differs by variant: without registers, bicubic by
``scale_factor = (n + 0.1) / n``; with registers, bicubic to the size with antialias.
"""

from .base import KeyMap

DINOV2 = KeyMap(
    family="dinov2",
    pos_embed="pos_embed",
    patch_embed="patch_embed.proj.weight",
    tokens=("cls_token",),
    native_method="dinov2",
    requires=("mask_token",),
    native_when=(("register_tokens", "dinov2-reg"),),
)
