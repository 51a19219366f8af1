"""timm ``VisionTransformer`` (and DeiT, whose facebookresearch checkpoints share the layout).

``pos_embed [1, p + H*W, D]`` holds rows for ``cls_token``, ``dist_token`` (DeiT distilled) and ``reg_token``
(``[1, R, D]``) in that order, unless the model was built with ``no_embed_class=True`` (DeiT-III, FlexiViT),
in which case it holds the grid only. No class token (global pool) means no class row.
"""

from .base import KeyMap

TIMM = KeyMap(
    family="timm",
    pos_embed="pos_embed",
    patch_embed="patch_embed.proj.weight",
    tokens=("cls_token", "dist_token", "reg_token"),
    native_method="timm",
    no_embed_class=True,
    description="timm VisionTransformer / DeiT: pos_embed, patch_embed.proj.weight, cls/dist/reg tokens",
)
