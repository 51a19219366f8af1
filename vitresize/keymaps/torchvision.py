"""torchvision ``VisionTransformer``.

``encoder.pos_embedding [1, 1 + H*W, D]`` (class row first), ``conv_proj.weight``, ``class_token``.
"""

from .base import KeyMap

TORCHVISION = KeyMap(
    family="torchvision",
    pos_embed="encoder.pos_embedding",
    patch_embed="conv_proj.weight",
    tokens=("class_token",),
    native_method="torchvision",
)
