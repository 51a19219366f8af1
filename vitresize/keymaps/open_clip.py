"""open_clip and OpenAI CLIP state dicts (``VisionTransformer`` tower).

``visual.positional_embedding [1 + H*W, W]`` (2-D, class row first), ``visual.conv1.weight`` (no bias),
``visual.class_embedding [W]``. The text tower's ``positional_embedding`` (no prefix, no conv beside it) is
left alone. open_clip's ``resize_pos_embed`` is bicubic with antialias. OpenAI's own ``.pt`` files are
TorchScript archives, refused (they cannot be loaded without running code).
"""

from .base import KeyMap

OPEN_CLIP = KeyMap(
    family="open_clip",
    pos_embed="positional_embedding",
    patch_embed="conv1.weight",
    tokens=("class_embedding",),
    native_method="open_clip",
    pos_layout="LD",
)
