"""Swin Transformer V1 and V2 as timm keeps them (``timm.models.swin_transformer``, ``swin_transformer_v2``).

Swin V1: no absolute table; each block has ``layers.S.blocks.B.attn.relative_position_bias_table
[(2w-1)^2, heads]`` over its attention window, which a new image size leaves alone (timm pads the grid to whole
windows) and ``--window`` changes. Where a stage's grid (``grid // 2**S``) is smaller than the window, timm
clamps that stage's window to it. timm's filter resizes the tables with ``resize_rel_pos_bias_table``.
``relative_position_index`` and ``attn_mask`` are buffers timm does not save: an index in an original checkpoint
is regenerated; a saved ``attn_mask`` (it depends on the grid too) is refused, as timm drops it.

Swin V2: the bias is a small MLP of log-spaced offsets (``cpb_mlp``) evaluated at run time for any window and
grid: nothing in its weights changes.
"""

from .base import KeyMap, Rule

_TABLE = r"layers\.(\d+)\.blocks\.\d+\.attn\.relative_position_bias_table"
_INDEX = r"layers\.(\d+)\.blocks\.\d+\.attn\.relative_position_index"
_V2_BUFFERS = r"layers\.\d+\.blocks\.\d+\.attn\.(relative_position_index|relative_coords_table)"

TIMM_SWIN = KeyMap(
    family="timm-swin",
    pos_embed=None,
    patch_embed="patch_embed.proj.weight",
    tokens=(),
    native_method="timm",
    markers=(_TABLE,),
    rules=(
        Rule(_TABLE, "rel_bias", span="window", stage=True),
        Rule(_INDEX, "rel_index", span="window", stage=True),
    ),
    scheme="relative",
    window=True,
    unsupported=(
        (
            r"layers\.\d+\.blocks\.\d+\.attn_mask",
            "{key} is an attention mask saved with the weights (an original Swin checkpoint), which depends on "
            "the grid; timm rebuilds it and its filter drops it: drop the attn_mask keys and convert again",
        ),
    ),
)

TIMM_SWINV2 = KeyMap(
    family="timm-swinv2",
    pos_embed=None,
    patch_embed="patch_embed.proj.weight",
    tokens=(),
    native_method="timm",
    markers=(r"layers\.\d+\.blocks\.\d+\.attn\.cpb_mlp\.",),
    untied=(_V2_BUFFERS,),
    scheme="relative",
    scheme_note="a continuous relative-position MLP (cpb_mlp) evaluated at run time for any window and grid",
    window=True,
)
