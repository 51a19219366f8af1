"""The stride of a hybrid ViT's CNN stem, read from its keys: the patch of a model whose kernel follows a CNN.

timm's hybrids keep the CNN under ``patch_embed.backbone``, then a ``patch_embed.proj`` whose kernel (1x1, or
8x8 in ``vit_tiny_r_s16_p8``) strides once more. The CNN's own stride S, from the keys alone:

- ResNetV2 (``vit_*_r26_*``, ``vit_*_r50_*``): a stride-4 stem (a stride-2 conv and a stride-2 pool), then the
  stages ``stages.N``: the first at stride 1, each later one at 2: S = 4 * 2**(stages - 1); a backbone of the
  stem alone (``vit_tiny_r_s16_p8``: ``backbone.conv``, no stages) has S = 4.
- ResNet-D as a feature extractor (``vit_*_resnet26d_*``, ``vit_*_resnet50d_*``): the same stem, ``layer1`` at
  stride 1 and each later layer at 2; the layers after the one used are not in the state dict:
  S = 4 * 2**(last layer - 1).
- vit_jax's R50+ViT (``conv_root``, ``block1..3/unitN``): S = 4 * 2**(blocks - 1).

The patch is S times the projection's kernel. A backbone built with dilation (``output_stride``) has the same
keys and a smaller stride; none of the released hybrids is, and the table's rows must still fit the grid.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .base import TensorInfo

__all__ = ["hybrid_stride", "jax_hybrid_stride", "square_kernel"]


def _indices(tensors: Mapping[str, TensorInfo], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in tensors if (m := rx.match(k))}


def square_kernel(info: TensorInfo | None, hwio: bool = False) -> int | None:
    """The side of a square conv kernel (``OIHW``, or ``HWIO``), or ``None`` for anything else."""
    if info is None or len(info.shape) != 4:
        return None
    h, w = (info.shape[0], info.shape[1]) if hwio else (info.shape[-2], info.shape[-1])
    return h if h == w else None


def hybrid_stride(tensors: Mapping[str, TensorInfo], prefix: str) -> int | None:
    """A timm hybrid's patch (``None`` for a model without a CNN under ``patch_embed.backbone``)."""
    base = re.escape(prefix) + r"patch_embed\.backbone\."
    kernel = square_kernel(tensors.get(prefix + "patch_embed.proj.weight"))
    if kernel is None:
        return None
    stages = _indices(tensors, base + r"stages\.(\d+)\.")
    layers = _indices(tensors, base + r"layer(\d+)\.")
    if stages:
        if stages != set(range(len(stages))):
            return None
        return (4 << (len(stages) - 1)) * kernel
    if layers:
        if layers != set(range(1, max(layers) + 1)):
            return None
        return (4 << (max(layers) - 1)) * kernel
    if (
        prefix + "patch_embed.backbone.conv.weight" in tensors
        or prefix + "patch_embed.backbone.stem.conv.weight" in tensors
    ):
        return 4 * kernel
    return None


def jax_hybrid_stride(tensors: Mapping[str, TensorInfo], prefix: str) -> int | None:
    """vit_jax's R50+ViT patch (``None`` without its ``conv_root``)."""
    if prefix + "conv_root/kernel" not in tensors:
        return None
    kernel = square_kernel(tensors.get(prefix + "embedding/kernel"), hwio=True)
    blocks = _indices(tensors, re.escape(prefix) + r"block(\d+)/")
    if kernel is None or not blocks or blocks != set(range(1, max(blocks) + 1)):
        return None
    return (4 << (max(blocks) - 1)) * kernel
