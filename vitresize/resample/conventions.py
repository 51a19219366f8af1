"""Interpolation conventions of the libraries whose resampling vitresize reproduces. Pure Python.

Each method names the exact ``F.interpolate`` arguments a library uses for the position table (the
Conventions table in README.md lists them). ``native`` is resolved per family by the key maps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import UsageError, param

__all__ = [
    "INTERPOLATIONS",
    "METHODS",
    "PATCH_BASES",
    "PATCH_BASIS",
    "PATCH_METHODS",
    "RESAMPLED_DTYPES",
    "Convention",
    "resolve_conventions",
]

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "area")
PATCH_METHODS = ("pi", "interp")
RESAMPLED_DTYPES = ("float16", "bfloat16", "float32", "float64")
"""The dtypes (torch's names) of the tables and kernels vitresize resamples. Integer, bool and complex tensors
have no meaningful interpolation, and float8 ones none in ``F.interpolate``: they are refused."""
_SMOOTH = ("bicubic", "bilinear")


@dataclass(frozen=True)
class Convention:
    """The arguments of one ``F.interpolate`` call: mode, antialias, align_corners (``None`` = torch default).

    ``scale_offset`` (DINOv2's hub code): interpolate by ``scale_factor = (new + offset) / old`` instead of to
    a size. ``float64``: compute in float64 (``scipy.ndimage.zoom``, which big_vision and vit_jax use, works
    in double precision; float32 would be off by ~3e-6).
    """

    interpolation: str = "bicubic"
    antialias: bool = False
    align_corners: bool | None = None
    scale_offset: float | None = None
    float64: bool = False

    def describe(self) -> str:
        parts = [self.interpolation]
        if self.antialias:
            parts.append("antialias")
        if self.align_corners:
            parts.append("align_corners")
        if self.scale_offset is not None:
            parts.append(f"scale_factor (n+{self.scale_offset})/n")
        if self.float64:
            parts.append("float64")
        return ", ".join(parts)


_TIMM = Convention("bicubic", antialias=True, align_corners=None)
_HF = Convention("bicubic", antialias=False, align_corners=False)

METHODS: dict[str, Convention] = {
    # timm checkpoint_filter_fn -> resample_abs_pos_embed (also open_clip, DINOv2-reg, HF DINOv2-reg)
    "timm": _TIMM,
    # torchvision.models.vision_transformer.interpolate_embeddings
    "torchvision": Convention("bicubic", antialias=False, align_corners=True),
    # DeiT / MAE / BEiT --finetune code
    "deit": _HF,
    # The original BEiT fine-tuning code: absolute tables as DeiT's; relative tables on BEiT's geometric grid
    # with SciPy's interp2d(kind="cubic") (vitresize.resample.tables, without SciPy)
    "beit": _HF,
    # Hugging Face interpolate_pos_encoding of ViT, DeiT, DINOv2, CLIP, SigLIP
    "hf": _HF,
    # Hugging Face Dinov2WithRegistersModel (antialiased)
    "hf-dinov2-reg": _TIMM,
    # open_clip resize_pos_embed
    "open_clip": _TIMM,
    # DINOv2 hub models without registers: scale_factor (n + 0.1) / n, bicubic
    "dinov2": Convention("bicubic", antialias=False, scale_offset=0.1),
    # DINOv2 hub models with registers: to the size, antialiased
    "dinov2-reg": _TIMM,
    # vit_jax load_pretrained / big_vision resample_posemb: scipy.ndimage.zoom(order=1), corner-aligned
    "big_vision": Convention("bilinear", antialias=False, align_corners=True, float64=True),
}

# The basis of the FlexiViT PI-resize as timm builds it (resample_patch_embed) ...
PATCH_BASIS = Convention("bicubic", antialias=True, align_corners=False)
# ... and as big_vision's FlexiViT does (tf.image.resize bilinear: half-pixel centres, no antialias).
PATCH_BASES: dict[str, Convention] = {"big_vision": Convention("bilinear", antialias=False, align_corners=False)}


def _override(base: Convention, interpolation: str | None, antialias: bool | None) -> Convention:
    conv = base
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            raise UsageError(f"{param('interpolation')} {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        conv = replace(conv, interpolation=interpolation)
    if antialias is not None:
        conv = replace(conv, antialias=antialias)
    if conv.interpolation not in _SMOOTH:
        if antialias:
            raise UsageError(
                f"{param('antialias', True)} works only with bicubic or bilinear, not {conv.interpolation}"
            )
        conv = replace(conv, antialias=False, align_corners=None, float64=False)
    return conv


def resolve_conventions(
    method: str,
    *,
    native: str,
    interpolation: str | None = None,
    antialias: bool | None = None,
) -> tuple[str, Convention, Convention]:
    """Resolve ``method`` and the overrides into the conventions for the position table and the patch basis.

    Args:
        method: ``native`` or a key of :data:`METHODS`.
        native: the method ``native`` stands for (the family's own library).
        interpolation: an override, applied to both conventions.
        antialias: an override, applied to both conventions.

    Returns:
        ``(method_name, pos_convention, patch_basis_convention)``; ``method_name`` is never ``native``.
    """
    name = native if method == "native" else method
    if name not in METHODS:
        raise UsageError(f"{param('method')} {method!r} is not one of native, {', '.join(METHODS)}")
    basis = PATCH_BASES.get(name, PATCH_BASIS)
    return name, _override(METHODS[name], interpolation, antialias), _override(basis, interpolation, antialias)
