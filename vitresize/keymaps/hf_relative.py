"""Hugging Face transformers vision models with relative position tables: BEiT / Data2Vec-vision and Swin / Swinv2.

``BeitModel`` / ``Beit*`` (prefix ``beit.``) and ``Data2VecVisionModel`` / ``Data2VecVision*``
(``data2vec_vision.``) keep one relative table per layer,
``encoder.layer.N.attention.attention.relative_position_bias.relative_position_bias_table``, or a shared one,
``encoder.relative_position_bias.relative_position_bias_table`` (transformers 5 names them
``layers.N.relative_position_bias.*`` and ``shared_position_bias.*`` in memory, and writes the older names with
``save_pretrained``; both are read), ``[(2h-1)(2w-1) + 3, heads]`` over the whole grid, the class rows last, as
timm's. Their shape follows ``config.image_size``, so a new size needs converted weights; transformers resamples the
table itself at run time for any input (bilinear, see :mod:`vitresize.resample.hf_tables`), and a conversion does
the same (op ``hf_rel_bias``), so that the converted model computes what the source computes at the new size
(``--method timm`` / ``beit``: those recipes instead). The source grid comes from the config.json (or
``--from-img-size``), not from the table's rows. An optional ``embeddings.position_embeddings [1, 1 + H*W, D]``
follows transformers' bicubic ``interpolate_pos_encoding``. transformers reads the table as ``(2w-1, 2h-1)``, right
only for a square grid, and takes one int ``patch_size``: non-square grids and patches are refused.
``relative_position_index`` is computed on the fly (older files saved it; transformers ignores it on load): one in a
file is regenerated.

``SwinModel`` (``swin.``): ``encoder.layers.S.blocks.B.attention.self.relative_position_bias_table
[(2W-1)^2, heads]`` on disk (``attention.relative_position_bias.*`` in memory), over one ``config.window_size`` for
every stage. Unlike timm, transformers never clamps a table to a smaller stage: at run time it shrinks the window
to the stage's grid and then fails to add the table's bias, so a target whose last stage's grid is smaller than
the window is refused. The tables are resized to ``--window`` with timm's recipe (transformers has none); an
optional ``embeddings.position_embeddings [1, H*W, D]`` (no class row) follows transformers' bicubic
``interpolate_pos_encoding``; an older file's ``relative_position_index`` is regenerated (``DonutSwinModel``, the
same layout, still saves it).

``Swinv2Model`` (``swinv2.``): the bias is an MLP of log-spaced offsets (``continuous_position_bias_mlp``)
evaluated at run time: nothing in its weights depends on the window or the grid (the window is set in the config,
with ``pretrained_window_sizes``). Its ``use_absolute_embeddings`` table is refused: transformers builds it one row
too long and cannot run it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GeometryError, param
from .base import KeyMap, Rule

__all__ = ["HF_BEIT", "HF_SWIN", "HF_SWINV2"]

Size = tuple[int, int]

_BEIT_BIAS = (
    r"(encoder\.layer\.\d+\.attention\.attention\.relative_position_bias|encoder\.relative_position_bias"
    r"|layers\.\d+\.relative_position_bias|shared_position_bias)\."
)
_BEIT_TABLE = _BEIT_BIAS + r"relative_position_bias_table"
_BEIT_INDEX = _BEIT_BIAS + r"relative_position_index"
_ABS = r"embeddings\.position_embeddings"

_SWIN_BIAS = r"encoder\.layers\.(\d+)\.blocks\.\d+\.attention\.(self|relative_position_bias)\."
_SWIN_TABLE = _SWIN_BIAS + r"relative_position_bias_table"
_SWIN_INDEX = _SWIN_BIAS + r"relative_position_index"
_SWINV2_MLP = r"encoder\.layers\.\d+\.blocks\.\d+\.attention\.self\.continuous_position_bias_mlp\."
_SWINV2_BUFFERS = r"encoder\.layers\.\d+\.blocks\.\d+\.attention\.self\.(relative_position_index|relative_coords_table)"


def _beit_square(key: str, grid: Size, patch: Size) -> Size:
    """The grid a BEiT table spans: the model's, which transformers handles only when square."""
    if grid[0] != grid[1] or patch[0] != patch[1]:
        raise GeometryError(
            f"{key}: transformers' BEiT and Data2Vec-vision take one square image_size and an int patch_size (they "
            f"read the relative table as (2w-1)x(2h-1), which scrambles a non-square grid's table), so a "
            f"{grid[0]}x{grid[1]} grid of {patch[0]}x{patch[1]} patches is refused; choose a square "
            f"{param('img_size')} and {param('patch')} (a square model runs on non-square images as it is, "
            f"resampling its tables at run time)"
        )
    return grid


@dataclass(frozen=True)
class _SwinWindow(Rule):
    """transformers' Swin: one square window for every stage, never clamped to a stage's grid (``stage=True``
    routes the target window through :meth:`stage_window`, which refuses instead of clamping)."""

    def stage_window(self, key: str, window: Size, grid: Size) -> Size:
        if window[0] != window[1]:
            raise GeometryError(
                f"transformers' Swin takes one square window_size, not {window[0]}x{window[1]}; pass a square "
                f"{param('window')}"
            )
        staged = self.stage_grid(key, grid)  # transformers pads odd sizes: ceil(grid / 2**s)
        assert staged is not None  # the rule has stages and matched this key
        s, stage = staged
        if min(stage) < window[0]:
            raise GeometryError(
                f"{key}: transformers' Swin uses its {window[0]}x{window[0]} window in every stage, and stage {s} of "
                f"a {grid[0]}x{grid[1]} patch grid is {stage[0]}x{stage[1]}, smaller than the window: transformers "
                f"shrinks the window there and then fails to add the table's bias; choose a {param('window')} of "
                f"at most {min(stage)}, or a larger {param('img_size')}"
            )
        return window


HF_BEIT = KeyMap(
    family="hf-beit",
    pos_embed=None,
    patch_embed="embeddings.patch_embeddings.projection.weight",
    tokens=("embeddings.cls_token",),
    native_method="hf",
    markers=(_BEIT_TABLE,),
    rules=(
        Rule(_BEIT_TABLE, "hf_rel_bias", span="grid", extra_rows=3, size=_beit_square),
        Rule(_BEIT_INDEX, "rel_index", span="grid", extra_rows=1, size=_beit_square),
        Rule(_ABS, "abs_table", span="grid", layout="1LD", extra_rows=1, size=_beit_square),
    ),
    scheme="relative",
)

HF_SWIN = KeyMap(
    family="hf-swin",
    pos_embed=None,
    patch_embed="embeddings.patch_embeddings.projection.weight",
    tokens=(),
    native_method="hf",
    markers=(_SWIN_TABLE,),
    rules=(
        _SwinWindow(_SWIN_TABLE, "rel_bias", span="window", stage=True),
        _SwinWindow(_SWIN_INDEX, "rel_index", span="window", stage=True),
        Rule(_ABS, "abs_table", span="grid", layout="1LD"),
    ),
    scheme="relative",
    window=True,
)

HF_SWINV2 = KeyMap(
    family="hf-swinv2",
    pos_embed=None,
    patch_embed="embeddings.patch_embeddings.projection.weight",
    tokens=(),
    native_method="hf",
    markers=(_SWINV2_MLP,),
    untied=(_SWINV2_BUFFERS,),
    scheme="relative",
    scheme_note="a continuous relative-position MLP (continuous_position_bias_mlp) evaluated at run time for any "
    "window and grid",
    window=True,
    unsupported=(
        (
            _ABS,
            "{key} is a Swinv2 absolute table (use_absolute_embeddings), which transformers builds one row too long "
            "for its grid and cannot run at any image size; vitresize does not convert it",
        ),
    ),
)
