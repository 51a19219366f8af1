"""timm ``VisionTransformer`` (and DeiT, whose facebookresearch checkpoints share the layout).

``pos_embed [1, p + H*W, D]`` holds rows for ``cls_token``, ``dist_token`` (DeiT distilled) and ``reg_token``
(``[1, R, D]``) in that order, unless the model was built with ``no_embed_class=True`` (DeiT-III, FlexiViT),
in which case it holds the grid only. No class token (global pool) means no class row.

The patch is the kernel's size only in a plain ViT. Hybrids (``vit_base_r50_s16_224``: a ResNet under
``patch_embed.backbone``, then a 1x1 or 8x8 ``patch_embed.proj``) embed at the CNN's stride times the kernel,
read from the backbone's keys (:mod:`.stems`); a backbone whose keys do not tell it needs the source's image
size. Hiera has its own map (``timm-hiera``).
Qwen3-VL's encoder (``merger.*``) keeps a fixed 48x48 table that it resamples at run time to any image size.
"""

from .base import KeyMap
from .stems import hybrid_stride

TIMM = KeyMap(
    family="timm",
    pos_embed="pos_embed",
    patch_embed="patch_embed.proj.weight",
    tokens=("cls_token", "dist_token", "reg_token"),
    native_method="timm",
    no_embed_class=True,
    stride=hybrid_stride,
    stems=((r"patch_embed\.(?!proj\.|norm\.)", "a CNN stem ({key})"),),
    untied=(r"rope\.freqs$",),  # the learned RoPE frequencies of vit_*_rope_mixed_ape (absolute table + RoPE)
    unsupported=(
        (
            r"merger\.",
            "{key} marks a Qwen3-VL vision encoder, which resamples this table at run time for any image "
            "size; use the weights as they are",
        ),
    ),
)
