"""What a conversion is asked for: the :class:`Target` geometry and the resampling :class:`Options`, typed and
validated here, once, whether they come from Python or from the command line. Pure Python.

Errors name the API's parameters (``img_size``); the CLI shows them as its flags (``--img-size``), see
:func:`vitresize.errors.param`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal, TypedDict, get_args

from .errors import UsageError, param
from .keymaps import KEYMAPS
from .resample.conventions import METHODS, resolve_conventions
from .resample.geometry import Size, format_size, parse_size

__all__ = [
    "ConvertFields",
    "ExecuteFields",
    "Family",
    "Interpolation",
    "Method",
    "Op",
    "Options",
    "OptionsFields",
    "OutputFormat",
    "PatchMethod",
    "SizeLike",
    "Target",
    "TargetFields",
]

SizeLike = int | str | tuple[int, int]
"""A size as a caller may give it: ``384``, ``"384"``, ``"384x512"`` (height x width) or ``(384, 512)``."""

Family = Literal[
    "auto",
    "dinov2",
    "timm-beit",
    "timm-swin",
    "timm-swinv2",
    "timm-tnt",
    "timm-volo",
    "timm-pit",
    "timm-visformer",
    "timm-nest",
    "timm-crossvit",
    "timm-crossvit-dagger",
    "timm-sam",
    "timm-mvitv2",
    "timm-hiera-abswin",
    "timm-hiera",
    "timm-levit",
    "timm-tinyvit",
    "timm-gcvit",
    "timm-maxxvit",
    "timm-maxxvit-rmlp",
    "timm",
    "timm-relpos",
    "timm-rope",
    "timm-twins",
    "timm-xcit",
    "timm-naflexvit",
    "timm-efficientformer",
    "torchvision",
    "hf-beit",
    "hf-swin",
    "hf-swinv2",
    "hf",
    "hf-clip",
    "open_clip",
    "vit_jax",
    "big_vision",
]
"""``auto`` or a checkpoint family: a key of :data:`vitresize.keymaps.KEYMAPS`."""
Method = Literal[
    "native",
    "timm",
    "torchvision",
    "deit",
    "beit",
    "hf",
    "hf-dinov2-reg",
    "open_clip",
    "dinov2",
    "dinov2-reg",
    "big_vision",
]
"""``native`` (the family's own library's convention) or a key of :data:`vitresize.resample.conventions.METHODS`."""
Interpolation = Literal["bicubic", "bilinear", "nearest", "area"]
PatchMethod = Literal["pi", "interp"]
"""``pi``: FlexiViT's pseudo-inverse resize of the patch kernel; ``interp``: plain interpolation of the kernel."""
OutputFormat = Literal["safetensors", "torch", "npz", "folder"]
"""What a conversion writes (a key of :data:`vitresize.formats.WRITERS`, or a model folder)."""
Op = Literal[
    "pos_embed",
    "abs_table",
    "patch_embed",
    "position_ids",
    "rel_bias",
    "rel_pos_1d",
    "rel_index",
    "attn_bias",
    "hf_rel_bias",
    "nest_table",
]
"""What a :class:`~vitresize.plans.TensorChange` does to its tensor (each has a function in
:data:`vitresize.resample.ops.OPS`)."""
GENERATED_OPS: frozenset[Op] = frozenset({"position_ids", "rel_index"})
"""Ops that build their tensor anew (integer buffers): the source is read only for its dtype."""

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{param(name)} {value!r} is not one of {', '.join(choices)}")


def _size(name: str, value: SizeLike | None) -> Size | None:
    return None if value is None else parse_size(value, option=param(name))


@dataclass(frozen=True, init=False)
class Target:
    """The geometry to convert to, and what the caller knows of the source's.

    Sizes are given as ``384``, ``"384x512"`` (height x width) or ``(384, 512)`` and stored as ``(h, w)``.

    Attributes:
        img_size: the new image size (the grid is ``img_size / patch``).
        patch: the new patch size; alone, it keeps the image size.
        grid: the new patch grid, instead of ``img_size``.
        from_img_size: the image size the checkpoint was trained at, for a source whose grid the weights do not
            tell (a non-square one) or whose patch is a stem's stride.
        from_grid: the source's patch grid, instead of ``from_img_size``.
        window: the new attention window of a windowed model (Swin); its relative tables are resampled to it.

    Raises:
        UsageError: a size that is not one, ``grid`` with ``img_size``, or ``from_grid`` with ``from_img_size``.

    Example:
        >>> Target(img_size="384x512", patch=16).grid is None
        True
    """

    img_size: Size | None
    patch: Size | None
    grid: Size | None
    from_img_size: Size | None
    from_grid: Size | None
    window: Size | None

    def __init__(
        self,
        *,
        img_size: SizeLike | None = None,
        patch: SizeLike | None = None,
        grid: SizeLike | None = None,
        from_img_size: SizeLike | None = None,
        from_grid: SizeLike | None = None,
        window: SizeLike | None = None,
    ) -> None:
        given = {"img_size": img_size, "patch": patch, "grid": grid, "from_img_size": from_img_size}
        for name, value in {**given, "from_grid": from_grid, "window": window}.items():
            object.__setattr__(self, name, _size(name, value))
        if self.grid is not None and self.img_size is not None:
            raise UsageError(
                f"give either {param('grid')} or {param('img_size')}, not both (the grid is image size / patch)"
            )
        if self.from_grid is not None and self.from_img_size is not None:
            raise UsageError(f"give either {param('from_grid')} or {param('from_img_size')}, not both")

    @property
    def is_empty(self) -> bool:
        """Whether no new geometry is given (no ``img_size``, ``patch``, ``grid`` or ``window``)."""
        return self.img_size is None and self.patch is None and self.grid is None and self.window is None

    def describe(self) -> str:
        """The target as given, for messages: ``img_size 384 patch 16`` (``--img-size 384 --patch 16``)."""
        given = (("img_size", self.img_size), ("patch", self.patch), ("grid", self.grid), ("window", self.window))
        return " ".join(f"{param(n)} {v[0] if v[0] == v[1] else format_size(v)}" for n, v in given if v is not None)


@dataclass(frozen=True)
class Options:
    """How to find the ViT and resample it.

    Attributes:
        family: ``"auto"`` (from the key names) or a checkpoint family (``"timm"``, ``"hf"``, ...).
        method: the interpolation convention: ``"native"`` (the family's own library's) or a library's
            (``"timm"``, ``"torchvision"``, ``"deit"``, ``"hf"``, ``"big_vision"``, ...).
        interpolation: override the interpolation mode (position table and patch-resize basis).
        antialias: override antialiasing (bicubic and bilinear only).
        patch_method: ``"pi"`` (FlexiViT pseudo-inverse resize) or ``"interp"`` (plain kernel interpolation).
        device: where the resampling runs: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        allow_large: lift the size and memory budgets (see :mod:`vitresize.budgets`).

    Raises:
        UsageError: a value that is not one of the choices, or antialiasing asked of ``nearest``/``area``.
    """

    family: Family = "auto"
    method: Method = "native"
    interpolation: Interpolation | None = None
    antialias: bool | None = None
    patch_method: PatchMethod = "pi"
    device: str = "cpu"
    allow_large: bool = False

    def __post_init__(self) -> None:
        _choice("family", self.family, ("auto", *KEYMAPS))
        _choice("method", self.method, ("native", *METHODS))
        if self.interpolation is not None:
            _choice("interpolation", self.interpolation, get_args(Interpolation))
        _choice("patch_method", self.patch_method, get_args(PatchMethod))
        if type(self.allow_large) is not bool:
            raise UsageError(f"{param('allow_large')} {self.allow_large!r} is not True or False")
        if self.antialias is not None and type(self.antialias) is not bool:
            raise UsageError(f"{param('antialias')} {self.antialias!r} is not True, False or None")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise UsageError(f"{param('device')} {self.device!r} is not cpu, cuda or cuda:N")
        native = KEYMAPS[self.family].native_method if self.family in KEYMAPS else "timm"
        resolve_conventions(self.method, native=native, interpolation=self.interpolation, antialias=self.antialias)


class TargetFields(TypedDict, total=False):
    """:class:`Target`'s fields as keyword arguments of :func:`vitresize.plan` and :func:`vitresize.convert`."""

    img_size: SizeLike | None
    patch: SizeLike | None
    grid: SizeLike | None
    from_img_size: SizeLike | None
    from_grid: SizeLike | None
    window: SizeLike | None


class OptionsFields(TargetFields, total=False):
    """:class:`Target`'s and :class:`Options`' fields as keyword arguments."""

    family: Family
    method: Method
    interpolation: Interpolation | None
    antialias: bool | None
    patch_method: PatchMethod
    device: str
    allow_large: bool


class ExecuteFields(TypedDict, total=False):
    """The keyword arguments of :meth:`vitresize.plans.Plan.execute`, which :func:`vitresize.convert` takes too."""

    force: bool
    dry_run: bool
    select: str | None
    verify: bool
    fsync: bool
    progress: Callable[[int, int], None] | None


class ConvertFields(OptionsFields, ExecuteFields, total=False):
    """The keyword arguments of :func:`vitresize.convert`."""


TARGET_FIELDS = tuple(f.name for f in fields(Target))
OPTIONS_FIELDS = tuple(f.name for f in fields(Options))
EXECUTE_FIELDS = tuple(ExecuteFields.__annotations__)


def resolve(target: Target | None, options: Options | None, kwargs: dict[str, object]) -> tuple[Target, Options]:
    """The target and options of a call: given as objects, or as keyword arguments (not both for either).

    Raises:
        TypeError: an unknown keyword argument (as Python raises for a misspelt one).
        UsageError: an invalid value.
    """
    if target is not None and not isinstance(target, Target):
        raise TypeError(f"target must be a vitresize.Target, not {type(target).__name__}; pass Target(img_size=...)")
    if options is not None and not isinstance(options, Options):
        raise TypeError(f"options must be a vitresize.Options, not {type(options).__name__}; pass Options(...)")
    unknown = sorted(set(kwargs) - set(TARGET_FIELDS) - set(OPTIONS_FIELDS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    geometry = {k: v for k, v in kwargs.items() if k in TARGET_FIELDS}
    choices = {k: v for k, v in kwargs.items() if k in OPTIONS_FIELDS}
    if target is not None and geometry:
        raise TypeError(f"give the geometry either as target= or as keywords ({', '.join(geometry)}), not both")
    if options is not None and choices:
        raise TypeError(f"give the options either as options= or as keywords ({', '.join(choices)}), not both")
    return target or Target(**geometry), options or Options(**choices)  # type: ignore[arg-type]
