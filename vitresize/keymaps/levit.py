"""timm LeViT and TinyViT: no absolute table; attention-bias tables ``attention_biases [heads, h*w]`` (a bias per
head and per offset ``(|dy|, |dx|)``, row-major), read through an index buffer ``attention_bias_idxs`` that timm
rebuilds (``persistent=False``) and its filters drop.

LeViT (``timm.models.levit``, ``levit_*`` and ``levit_conv_*``: the same keys): a stem of stride-2 convolutions
(``stem.conv1..4``: stride 16; ``stem.conv1..3`` in the ``_s8`` models: stride 8), then stages at the
resolution ``r_0 = image // stride`` and ``r_s = ceil(r_(s-1) / 2)`` per axis. Each block's table spans its
stage's resolution; each stage's ``downsample.attn_downsample`` table spans the keys it attends to, the previous
stage's resolution. A new image size resamples every table as timm's ``resize_rel_pos_bias_table_levit``
(bicubic, antialias), which is what timm's TinyViT and EfficientViT-MSRA filters do (LeViT's own filter resizes
nothing). The index buffer, saved by older checkpoints, is refused: it depends on the resolution, and timm drops it.

TinyViT (``timm.models.tiny_vit``): the tables span the attention windows (``window_sizes``, default 7, 7, 14, 7),
which do not depend on the image size: the model takes any input (it pads to whole windows) and has no
``img_size``. A new image size changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .base import KeyMap, Rule, TensorInfo, square_window

_STAGE0 = r"stages\.0\.blocks\.\d+\.attn\.attention_biases"
_LATER = r"stages\.([1-9]\d*)\.(blocks\.\d+\.attn|downsample\.attn_downsample)\.attention_biases"
_IDXS = r"stages\.\d+\.(blocks\.\d+\.attn|downsample\.attn_downsample)\.attention_bias_idxs"


def _levit_stride(tensors: Mapping[str, TensorInfo], prefix: str) -> int | None:
    """LeViT's patch: 2 to the number of stride-2 convs in its stem (``stem.convN.linear``): 16, or 8 (``_s8``)."""
    rx = re.compile(re.escape(prefix) + r"stem\.conv\d+\.linear\.weight")
    n = sum(1 for k in tensors if rx.fullmatch(k))
    return 2**n if n else None


def _tinyvit_stride(tensors: Mapping[str, TensorInfo], prefix: str) -> int | None:
    """TinyViT's patch: 2 to the number of stride-2 convs in its patch embedding (``patch_embed.convN.conv``): 4."""
    rx = re.compile(re.escape(prefix) + r"patch_embed\.conv\d+\.conv\.weight")
    n = sum(1 for k in tensors if rx.fullmatch(k))
    return 2**n if n else None


def _levit_resolution(key: str, grid: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    """The resolution a later stage's table spans: the grid halved (``ceil``, per axis, as timm's
    ``(r - 1) // 2 + 1``) once per stage before it, and once more for a block (its keys are after the stage's
    downsampling; the downsampling attends to the previous stage's)."""
    m = re.fullmatch(_LATER, key)
    assert m is not None  # the rule's pattern matched the key
    halvings = int(m.group(1)) - (0 if m.group(2).startswith("blocks") else 1)
    h, w = grid
    for _ in range(halvings):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return (h, w)


TIMM_LEVIT = KeyMap(
    family="timm-levit",
    pos_embed=None,
    patch_embed="stem.conv1.linear.weight",
    tokens=(),
    native_method="timm",
    markers=(_STAGE0 + "$",),
    rules=(
        Rule(_STAGE0, "attn_bias"),
        Rule(_LATER, "attn_bias", size=_levit_resolution),
    ),
    scheme="relative",
    scheme_note="attention-bias tables (attention_biases [heads, r*r]) over each stage's resolution",
    stride=_levit_stride,
    fixed_patch="LeViT's patch is a stem of stride-2 convolutions (stem.convN), not one kernel",
    unsupported=(
        (
            _IDXS,
            "{key} is an index buffer saved with the weights (an older checkpoint), which depends on the "
            "resolution; timm rebuilds it and its checkpoint_filter_fn drops it: drop the attention_bias_idxs "
            "keys and convert again",
        ),
    ),
)


TIMM_TINYVIT = KeyMap(
    family="timm-tinyvit",
    pos_embed=None,
    patch_embed="patch_embed.conv1.conv.weight",
    tokens=(),
    native_method="timm",
    markers=(r"stages\.\d+\.blocks\.\d+\.attn\.attention_biases$",),
    forbids=(r"patch_embed\.conv3\.",),  # EfficientViT-MSRA: the same first conv, a stride-16 stem
    rules=(Rule(r"stages\.\d+\.blocks\.\d+\.attn\.attention_biases", "attn_bias", span="window", scale=True),),
    window=True,
    untied=(r"stages\.\d+\.blocks\.\d+\.attn\.attention_bias_idxs$",),  # timm rebuilds it; its filter drops it
    scheme="relative",
    scheme_note=(
        "attention-bias tables over the attention windows (timm's window_sizes, 7, 7, 14, 7 by default), which do "
        "not depend on the image size: the model pads any input to whole windows; --window scales them"
    ),
    stride=_tinyvit_stride,
    fixed_patch="TinyViT's patch is a stem of two stride-2 convolutions (patch_embed.conv1, conv2), not one kernel",
    check_target=square_window("timm's TinyViT"),
)
