"""timm MViTv2 (``timm.models.mvitv2``: ``mvitv2_tiny``, ``_small``, ``_base``, ``_large`` and the ``_cls``
variants).

No absolute table; every block has 1-D relative tables ``stages.S.blocks.B.attn.rel_pos_h`` and ``rel_pos_w``
``[2n-1, head_dim]``, ``n = max(q, kv)``: the query and key/value grids of that block, which follow the patch
grid ``P = img / 4`` (a 7x7 stride-4 stem conv) through the query pooling (stride 1, 2, 2, 2 by stage) and the
adaptive key/value pooling (4, 2, 1, 1). Stage ``S`` works at ``F_S = P / 2**S``; its first block reads the
previous stage's grid. timm's filter resizes the tables (linear, as SAM's ``get_rel_pos``) to the lengths
of the model built at the target; nothing is resampled at run time. timm builds square models only, and runs
them at image sides that are multiples of 32.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import GeometryError
from .base import KeyMap, Rule, TensorInfo

_TABLE = r"stages\.(\d+)\.blocks\.(\d+)\.attn\.rel_pos_"
_STAGES = 4


def _stride(tensors: Mapping[str, TensorInfo], prefix: str) -> int:
    """MViTv2's patch: its stem conv's stride, 4 in every timm model (``patch_stride``)."""
    return 4


def _sizes(grid: tuple[int, int], patch: tuple[int, int], window: tuple[int, int] | None) -> str | None:
    """Why timm's MViTv2 cannot run at a target grid (``None``: it can)."""
    img = (grid[0] * patch[0], grid[1] * patch[1])
    if grid[0] != grid[1] or grid[0] % 8:
        return (
            f"timm's MViTv2 runs at square image sizes whose side is a multiple of 32 (a stride-4 stem, then three "
            f"2x poolings), and {img[0]}x{img[1]} is not one; choose e.g. {max(32, img[0] // 32 * 32)}"
        )
    return None


def _span(key: str, grid: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    """The grid ``(n, n)`` that the table ``key`` of an MViTv2 at ``grid`` spans (``n = max(q, kv)``).

    Raises:
        GeometryError: a grid timm cannot run (not square, or an image side not a multiple of 32), or a stage
            index past timm's four stages.
    """
    m = re.match(_TABLE, key)
    assert m is not None  # the rule's pattern matched
    stage, block = int(m.group(1)), int(m.group(2))
    why = _sizes(grid, patch, None)
    if why is not None:  # a source the library cannot run (a target is refused before, by check_target)
        raise GeometryError(why)
    if stage >= _STAGES:
        raise GeometryError(f"{key} is in stage {stage}, and timm's MViTv2 has {_STAGES}; its layout is not known")
    p = grid[0]
    q = p >> stage  # stage S works at P / 2**S (query strides 1, 2, 2, 2)
    seen = p >> max(stage - 1, 0) if block == 0 else q  # the first block reads the previous stage's grid
    kv = seen // max(4 >> stage, 1)  # adaptive key/value strides 4, 2, 1, 1
    n = max(q, kv)
    return (n, n)


TIMM_MVITV2 = KeyMap(
    family="timm-mvitv2",
    pos_embed=None,
    patch_embed="patch_embed.proj.weight",
    tokens=("cls_token",),
    native_method="timm",
    markers=(_TABLE + "h$", _TABLE + "w$"),
    rules=(
        Rule(_TABLE + "h", "rel_pos_1d", span="grid", layout="LD", axis=0, size=_span),
        Rule(_TABLE + "w", "rel_pos_1d", span="grid", layout="LD", axis=1, size=_span),
    ),
    scheme="relative",
    stride=_stride,
    fixed_patch="MViTv2's patch is a 7x7 stride-4 stem conv (overlapping, padded), not a patchify kernel",
    check_target=_sizes,
)
