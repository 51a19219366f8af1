"""Hugging Face transformers vision models.

``ViTModel``, ``DeiTModel``, ``Dinov2Model`` and ``Dinov2WithRegistersModel`` share one layout under their
model prefix (``vit.``, ``deit.``, ``dinov2.`` or none): ``embeddings.position_embeddings [1, p + H*W, D]``
with rows for ``embeddings.cls_token`` and (DeiT) ``embeddings.distillation_token``; DINOv2's
``embeddings.register_tokens`` and ``mask_token`` live outside the table. ``interpolate_pos_encoding`` is
bicubic without antialias, except in ``Dinov2WithRegistersModel``, which antialiases.

``CLIPVisionModel`` / ``CLIPModel`` (``vision_model.`` prefix) and SigLIP keep a 2-D ``nn.Embedding`` table
``embeddings.position_embedding.weight [p + H*W, D]`` (CLIP: one row for ``embeddings.class_embedding``;
SigLIP: none) and a bias-free (CLIP) conv ``embeddings.patch_embedding.weight``. The text tower's table
(``text_model.embeddings.position_embedding.weight``) has no patch kernel beside it and is never matched.
Older CLIP files carry the buffer ``embeddings.position_ids``, which is rewritten to count the new rows.
``ViTHybridModel`` keeps a BiT backbone under ``embeddings.patch_embeddings.backbone``: its 1x1 projection
is not the patch.
"""

from .base import KeyMap, Rule

HF_VIT = KeyMap(
    family="hf",
    pos_embed="embeddings.position_embeddings",
    patch_embed="embeddings.patch_embeddings.projection.weight",
    tokens=("embeddings.cls_token", "embeddings.distillation_token"),
    native_method="hf",
    native_when=(("embeddings.register_tokens", "hf-dinov2-reg"),),
    stems=((r"embeddings\.patch_embeddings\.(?!projection\.)", "a CNN stem ({key})"),),
)

HF_CLIP = KeyMap(
    family="hf-clip",
    pos_embed="embeddings.position_embedding.weight",
    patch_embed="embeddings.patch_embedding.weight",
    tokens=("embeddings.class_embedding",),
    native_method="hf",
    pos_layout="LD",
    rules=(Rule(r"embeddings\.position_ids", "position_ids"),),
)
