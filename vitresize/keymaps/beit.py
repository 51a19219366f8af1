"""BEiT, BEiT v2 and Data2Vec-vision as timm keeps them (``timm.models.beit``).

No absolute table (but ``pos_embed [1, 1 + H*W, D]`` in variants built with ``use_abs_pos_emb``, resampled
with its class row kept): each block has ``blocks.N.attn.relative_position_bias_table [(2h-1)(2w-1) + 3, heads]`` over
the whole patch grid (the window is the grid), its last three rows for the class token (class-to-token,
token-to-class, class-to-class), kept as they are; a shared table ``rel_pos_bias.relative_position_bias_table``
in some checkpoints. timm does not save ``relative_position_index``; original checkpoints do, and it is
regenerated for the new grid. timm's filter resizes the tables with ``resize_rel_pos_bias_table`` (the BEiT
recipe: offsets on a geometric progression, sampled linearly) and the kernel with PI-resize.
"""

from .base import KeyMap, Rule

_TABLE = r"(blocks\.\d+\.attn\.|rel_pos_bias\.)relative_position_bias_table"
_INDEX = r"(blocks\.\d+\.attn\.|rel_pos_bias\.)relative_position_index"

TIMM_BEIT = KeyMap(
    family="timm-beit",
    pos_embed="pos_embed",
    pos_optional=True,
    patch_embed="patch_embed.proj.weight",
    tokens=("cls_token",),
    native_method="timm",
    markers=(_TABLE,),
    rules=(Rule(_TABLE, "rel_bias", span="grid", extra_rows=3), Rule(_INDEX, "rel_index", span="grid", extra_rows=1)),
    scheme="relative",
)
