"""timm ViTs without a position table, whose encodings are computed at run time for any grid.

Eva-based RoPE models (``vit_*_rope*``, DINOv3: ``blocks.N.attn.qkv`` or ``q_proj``, ``cls_token``, no
``pos_embed``; the rotary tables are buffers timm does not save, and the ``rope_mixed`` models' learned per-head
frequencies ``rope.freqs`` do not depend on the grid) and ``vit_relpos_*`` / ``vit_srelpos_*`` (a small
MLP of log-spaced offsets, ``rel_pos.mlp`` per block or ``shared_rel_pos.mlp``, evaluated for whatever grid the
input has). A new image size changes no tensor; a new patch resizes the kernel only (as timm's Eva filter does).
"""

from .base import KeyMap

TIMM_ROPE = KeyMap(
    family="timm-rope",
    pos_embed=None,
    patch_embed="patch_embed.proj.weight",
    tokens=("cls_token", "reg_token"),
    native_method="timm",
    markers=(r"blocks\.\d+\.attn\.(qkv|q_proj)\.weight",),
    forbids=(r"pos_embed", r"(blocks\.\d+\.attn\.|shared_)rel_pos\.", r"patch_embed\.(?!proj\.)"),
    untied=(r"rope\.freqs$",),
    scheme="rotary",
    scheme_note="rotary embeddings (RoPE, or none) computed at run time for any grid",
)

TIMM_RELPOS = KeyMap(
    family="timm-relpos",
    pos_embed=None,
    patch_embed="patch_embed.proj.weight",
    tokens=("cls_token", "reg_token"),
    native_method="timm",
    markers=(r"(blocks\.\d+\.attn\.|shared_)rel_pos\.mlp\.",),
    forbids=(r"pos_embed", r"patch_embed\.(?!proj\.)"),
    untied=(r"(blocks\.\d+\.attn\.|shared_)rel_pos\.mlp\.",),
    scheme="relative",
    scheme_note="an MLP of relative offsets (timm vit_relpos) evaluated at run time for any grid",
)
