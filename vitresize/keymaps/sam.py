"""timm's SAM image encoder (``timm.models.vision_transformer_sam``: ``samvit_base_patch16``, ``_large_``,
``_huge_``), and the same keys under an original SAM checkpoint's ``image_encoder.`` prefix.

``pos_embed [1, H, W, D]`` (NHWC, no prefix rows) over the patch grid; each block has 1-D relative tables
``blocks.N.attn.rel_pos_h [2h-1, head_dim]`` and ``rel_pos_w [2w-1, head_dim]``. The global-attention blocks'
tables span the grid (``h, w = H, W``), the windowed blocks' span the window (14: ``[27, head_dim]``), which a
new image size leaves alone and ``--window`` changes; the two are told apart by their length (a grid equal to
the window cannot be). timm's filter resizes nothing: the model resamples at run time, ``pos_embed`` with
``resample_abs_pos_embed_nhwc`` (bicubic, antialias) and the tables with ``get_rel_pos`` (linear), which is
the convention. The patch kernel is a plain patchify conv (kernel = stride), so PI-resize applies.
"""

import re
from collections.abc import Mapping

from .base import KeyMap, Rule, TensorInfo, square_window

_REL = r"blocks\.\d+\.attn\.rel_pos_"


def _grid(tensors: Mapping[str, TensorInfo], prefix: str) -> tuple[int, int] | None:
    """The grid of a SAM without ``pos_embed``, where its tables tell it: all of one length, the grid being the
    window (``samvit_base_patch16_224``). Else which tables are global cannot be read: ``None`` (unknown)."""
    if prefix + "pos_embed" in tensors:
        return None
    lengths = {v.shape[0] for k, v in tensors.items() if re.fullmatch(re.escape(prefix) + _REL + "[hw]", k) and v.shape}
    if len(lengths) != 1:
        return None
    n = lengths.pop()
    return ((n + 1) // 2, (n + 1) // 2) if n % 2 else None


TIMM_SAM = KeyMap(
    family="timm-sam",
    pos_embed="pos_embed",
    pos_optional=True,  # samvit_base_patch16_224 has none (its grid is its window: change both, or neither)
    patch_embed="patch_embed.proj.weight",
    tokens=(),
    native_method="timm",
    pos_layout="1HWD",
    markers=(_REL + "h$", _REL + "w$"),
    rules=(
        Rule(_REL + "h", "rel_pos_1d", span="grid", layout="LD", axis=0),
        Rule(_REL + "w", "rel_pos_1d", span="grid", layout="LD", axis=1),
    ),
    window=True,
    check_target=square_window("timm's SAM"),
    grid=_grid,
)
