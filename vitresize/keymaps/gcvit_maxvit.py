"""timm GCViT and MaxxViT (MaxViT, CoAtNet): relative bias tables over windows that timm derives from the image size.

GCViT (``timm.models.gcvit``): each block's ``stages.S.blocks.B.attn.rel_pos.relative_position_bias_table``
``[(2h-1)(2w-1), heads]`` spans stage S's window, ``image // (32, 32, 16, 32)[S]`` per axis (from the image size,
not the feature size). The model builds and runs only where every window divides its stage's feature map: at
image sizes that are multiples of 32.

MaxxViT (``timm.models.maxxvit``): MaxViT's block (``attn_block``) and grid (``attn_grid``) attention both
partition every stage into windows of ``image // 32`` (its ``partition_ratio``); the tables are ``[heads, 2h-1, 2w-1]``
(``bias_tf``: the ``*_tf_*`` models) or ``[(2h-1)(2w-1), heads]`` (``bias``: the ``*_rw_*`` models, the
parallel ``_pm`` blocks, MaxxViT-V2). CoAtNet's transformer blocks (``stages.S.blocks.B.attn.rel_pos``) attend
over their whole stage, ``image // 2**(S+2)``. The ``rmlp`` models compute the bias with an MLP
(``rel_pos.mlp``) at run time: nothing to resample (family ``timm-maxxvit-rmlp``). The partitions must divide
every stage: image sizes that are multiples of 32.

timm resizes these tables with ``resize_rel_pos_bias_table`` (maxxvit's ``checkpoint_filter_fn``; GCViT has no
filter, and ``RelPosBias.set_window_size`` does the same). vitresize counts the grid in cells of the first
table's span (32 pixels for GCViT and MaxViT, 16 for CoAtNet's first transformer stage), so that the first table
spans the model's grid and the other tables a size derived from it (``Rule.size``); the stem is conv layers whose
patch cannot change.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

from ..errors import GeometryError
from .base import KeyMap, Rule, TensorInfo

__all__ = ["TIMM_GCVIT", "TIMM_MAXXVIT", "TIMM_MAXXVIT_RMLP"]

Size = tuple[int, int]

_GC_TABLE = r"stages\.(\d+)\.blocks\.\d+\.attn\.rel_pos\.relative_position_bias_table"
_GC_RATIOS = (32, 32, 16, 32)
"""GCViT's ``window_ratio``: the window of stage S is ``image // _GC_RATIOS[S]``."""

_M_TABLE = (
    r"stages\.(\d+)\.blocks\.\d+\.(?:attn_block\.attn|attn_grid\.attn|attn\.attn_block|attn\.attn_grid)"
    r"\.rel_pos\.relative_position_bias_table"
)
_T_TABLE = r"stages\.(\d+)\.blocks\.\d+\.attn\.rel_pos\.relative_position_bias_table"
_MULTIPLE = 32
"""Both families build and run at image sizes that are multiples of 32 (their windows must divide every stage)."""


@dataclass(frozen=True)
class _TableRule(Rule):
    """A ``rel_bias`` rule whose layout follows the tensor: ``HLL`` (``[heads, 2h-1, 2w-1]``, timm's ``bias_tf``)
    for three dimensions, ``LH`` (``[(2h-1)(2w-1), heads]``) for two. The two share their key names."""

    def _as(self, shape: tuple[int, ...]) -> Rule:
        values = {f.name: getattr(self, f.name) for f in fields(Rule)}
        return Rule(**{**values, "layout": "HLL" if len(shape) == 3 else "LH"})

    def shape_for(self, shape: tuple[int, ...], size: Size, rows: int = 0) -> tuple[int, ...] | None:
        return self._as(shape).shape_for(shape, size, rows)

    def square_span(self, shape: tuple[int, ...]) -> Size | None:
        return self._as(shape).square_span(shape)


def _image(grid: Size, patch: Size, family: str) -> Size:
    """The image size of ``grid`` cells of ``patch`` pixels, refused unless ``family`` builds at it."""
    img = (grid[0] * patch[0], grid[1] * patch[1])
    if img[0] % _MULTIPLE or img[1] % _MULTIPLE or min(img) <= 0:
        size = f"{img[0]}x{img[1]}"
        ok = f"{max(img[0] // _MULTIPLE, 1) * _MULTIPLE}x{max(img[1] // _MULTIPLE, 1) * _MULTIPLE}"
        raise GeometryError(
            f"timm's {family} runs only at image sizes that are multiples of {_MULTIPLE} (its stages and attention "
            f"windows are the image divided by up to {_MULTIPLE}), not {size}; use a multiple of {_MULTIPLE} "
            f"(e.g. {ok})"
        )
    return img


def _check_target(grid: Size, patch: Size, window: Size | None) -> str | None:
    """Why timm cannot build the model at ``grid`` cells of ``patch`` pixels: an image size not a multiple of 32."""
    img = (grid[0] * patch[0], grid[1] * patch[1])
    if img[0] % _MULTIPLE == 0 and img[1] % _MULTIPLE == 0:
        return None
    return (
        f"timm builds it only at image sizes that are multiples of {_MULTIPLE} (its stages and attention windows "
        f"are the image divided by up to {_MULTIPLE}), not {img[0]}x{img[1]}"
    )


def _stage(pattern: str, key: str) -> int:
    m = re.fullmatch(pattern, key)
    assert m is not None  # the rule's pattern matched the key
    return int(m.group(1))


def _gcvit_window(key: str, grid: Size, patch: Size) -> Size:
    """GCViT's window of the stage ``key`` belongs to: ``image // window_ratio[stage]``."""
    img = _image(grid, patch, "GCViT")
    s = _stage(_GC_TABLE, key)
    if s >= len(_GC_RATIOS):
        raise GeometryError(
            f"{key} belongs to stage {s}, and timm's GCViT has window ratios for stages 0-{len(_GC_RATIOS) - 1} "
            f"only (a model built with its own window_size); it is refused rather than converted wrongly"
        )
    r = _GC_RATIOS[s]
    return (img[0] // r, img[1] // r)


def _maxxvit_window(key: str, grid: Size, patch: Size) -> Size:
    """MaxViT's partition (``image // 32`` at every stage) for block and grid attention; CoAtNet's stage feature
    size for a transformer block: the stem's ``image // 2``, then ``(r - 1) // 2 + 1`` per stage, as timm builds it."""
    img = _image(grid, patch, "MaxxViT (MaxViT, CoAtNet)")
    if re.fullmatch(_M_TABLE, key):
        return (img[0] // _MULTIPLE, img[1] // _MULTIPLE)
    h, w = img[0] // 2, img[1] // 2
    for _ in range(_stage(_T_TABLE, key) + 1):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return (h, w)


def _windows(info: TensorInfo) -> list[Size]:
    """Every window a table of this shape can span (a non-square ``LH`` table's rows factor several ways)."""
    shape = info.shape
    if len(shape) == 3:
        h, w = shape[1], shape[2]
        return [((h + 1) // 2, (w + 1) // 2)] if h % 2 and w % 2 else []
    if len(shape) != 2 or shape[0] <= 0:
        return []
    rows = shape[0]
    return [((a + 1) // 2, (rows // a + 1) // 2) for a in range(1, rows + 1, 2) if rows % a == 0 and (rows // a) % 2]


def _stride_for(
    rules: tuple[Rule, ...], family: str, first_stride: Callable[[str], int]
) -> Callable[[Mapping[str, TensorInfo], str], int | None]:
    """The stride callable of a family whose tables span sizes derived from the image: the stride at which the
    first table (in key order, the one vitresize reads the source grid from) spans the grid.

    Raises:
        GeometryError: the tables fit no image size together (a model built with its own window sizes: timm's
            ``window_size``, ``transformer_window_size``), which this map's sizes would convert wrongly.
    """

    def stride(tensors: Mapping[str, TensorInfo], prefix: str) -> int | None:
        tables = [
            (k[len(prefix) :], r, v)
            for k, v in tensors.items()
            if k.startswith(prefix)
            for r in rules
            if r.matches(k[len(prefix) :])
        ]
        if not tables:
            return _MULTIPLE
        first, _, info = tables[0]
        p = first_stride(first)
        for window in _windows(info):
            try:
                if all(r.size is None or r.spans(v.shape, r.size(k, window, (p, p))) for k, r, v in tables):
                    return p
            except GeometryError:
                continue
        raise GeometryError(
            f"{prefix}{first} {list(info.shape)} and the other relative tables of its model span windows that timm's "
            f"{family} does not derive from one image size (a model built with its own window sizes?); it is refused "
            f"rather than converted wrongly"
        )

    return stride


def _gcvit_first(key: str) -> int:
    s = _stage(_GC_TABLE, key)
    return _GC_RATIOS[s] if s < len(_GC_RATIOS) else _MULTIPLE


def _maxxvit_first(key: str) -> int:
    return _MULTIPLE if re.fullmatch(_M_TABLE, key) else 2 ** (_stage(_T_TABLE, key) + 2)


_GC_RULES: tuple[Rule, ...] = (Rule(_GC_TABLE, "rel_bias", size=_gcvit_window),)
_MAXX_RULES: tuple[Rule, ...] = (_TableRule(f"(?:{_M_TABLE}|{_T_TABLE})", "rel_bias", size=_maxxvit_window),)

TIMM_GCVIT = KeyMap(
    family="timm-gcvit",
    pos_embed=None,
    patch_embed="stem.conv1.weight",
    tokens=(),
    native_method="timm",
    markers=(r"stem\.down\.", r"stages\.\d+\.global_block\.", _GC_TABLE + "$"),
    rules=_GC_RULES,
    scheme="relative",
    scheme_note="windows of image // (32, 32, 16, 32) per stage (the grid counts 32-pixel cells)",
    stride=_stride_for(_GC_RULES, "GCViT", _gcvit_first),
    check_target=_check_target,
    fixed_patch="GCViT's stem is a stride-2 conv and a strided downsampling, not a patch kernel",
)

_MAXX_MLP = r"stages\.\d+\.blocks\.\d+\.(attn|attn_block|attn_grid)\.(attn\.|attn_block\.|attn_grid\.)?rel_pos\.mlp\."
_MAXX_STEM = "MaxxViT's stem is two 3x3 convs (stem.conv1, stride 2, and stem.conv2), not a patch kernel"


def _stride32(tensors: Mapping[str, TensorInfo], prefix: str) -> int:
    """The grid of a MaxxViT without tables counts 32-pixel cells too (the image sizes it runs at)."""
    return _MULTIPLE


TIMM_MAXXVIT = KeyMap(
    family="timm-maxxvit",
    pos_embed=None,
    patch_embed="stem.conv1.weight",
    tokens=(),
    native_method="timm",
    markers=(r"stem\.conv2\.", f"(?:{_M_TABLE}|{_T_TABLE})$"),
    forbids=(r"stages\.\d+\.global_block\.",),
    untied=(_MAXX_MLP,),
    rules=_MAXX_RULES,
    scheme="relative",
    scheme_note="windows of image // 32 (MaxViT's block and grid attention) or a stage's feature map (CoAtNet)",
    stride=_stride_for(_MAXX_RULES, "MaxxViT", _maxxvit_first),
    check_target=_check_target,
    fixed_patch=_MAXX_STEM,
)

TIMM_MAXXVIT_RMLP = KeyMap(
    family="timm-maxxvit-rmlp",
    pos_embed=None,
    patch_embed="stem.conv1.weight",
    tokens=(),
    native_method="timm",
    markers=(r"stem\.conv2\.", _MAXX_MLP),
    forbids=(r"stages\.\d+\.global_block\.",),
    untied=(_MAXX_MLP,),
    scheme="relative",
    scheme_note="an MLP of log-spaced offsets (rel_pos.mlp) evaluated at run time for any window",
    stride=_stride32,
    check_target=_check_target,
    fixed_patch=_MAXX_STEM,
)
