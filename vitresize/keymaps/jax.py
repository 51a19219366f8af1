"""JAX ``.npz`` checkpoints: the original ViT / AugReg (vit_jax) and big_vision layouts.

Keys are ``/``-separated paths, under an optional prefix (``params/``, ``params/img/``, ``opt/target/``).
The patch kernel ``embedding/kernel`` is HWIO ``[ph, pw, C, D]``. vit_jax keeps
``Transformer/posembed_input/pos_embedding [1, 1 + H*W, D]`` with a row for ``cls``; big_vision keeps
``pos_embedding [1, H*W, D]``, without a class row even when ``cls`` exists. Both resample the table with
``scipy.ndimage.zoom(order=1)``; FlexiViT resizes the kernel with a bilinear, non-antialiased basis.
vit_jax's R50+ViT hybrids keep a ResNet (``conv_root``, ``block1/unit1/...``) before a 1x1 ``embedding``.
"""

from .base import KeyMap
from .stems import jax_hybrid_stride

VIT_JAX = KeyMap(
    family="vit_jax",
    pos_embed="Transformer/posembed_input/pos_embedding",
    patch_embed="embedding/kernel",
    tokens=("cls",),
    native_method="big_vision",
    sep="/",
    patch_layout="HWIO",
    stride=jax_hybrid_stride,
    stems=((r"(conv_root|gn_root|block\d+/unit\d+)/", "a ResNet stem ({key})"),),
)

BIG_VISION = KeyMap(
    family="big_vision",
    pos_embed="pos_embedding",
    patch_embed="embedding/kernel",
    tokens=(),
    native_method="big_vision",
    sep="/",
    patch_layout="HWIO",
)
