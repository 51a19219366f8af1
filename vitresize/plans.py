"""What a conversion will do: the ViTs found (:class:`Embedding`), the geometry each moves to
(:class:`ModelPlan`), the tensors that change (:class:`TensorChange`), all in a :class:`Plan`. Frozen dataclasses
with ``to_dict()`` for ``--json``. Pure Python.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .keymaps import KEYMAPS
from .keymaps.base import RELATIVE_OPS, PatchLayout, PosLayout, Rule, Scheme, kernel_size
from .options import Op, Options, Target
from .resample.conventions import Convention
from .resample.geometry import Geometry, Size, format_size

if TYPE_CHECKING:
    from .formats.base import Checkpoint
    from .report import Report

__all__ = ["Embedding", "ModelPlan", "Plan", "TensorChange"]


def size_list(s: Size | None) -> list[int] | None:
    """``(h, w)`` as a JSON list."""
    return None if s is None else [s[0], s[1]]


@dataclass(frozen=True)
class Embedding:
    """One ViT found in a state dict: its family, embedding keys, prefix rows and source geometry.

    ``source`` is ``None`` when the grid cannot be inferred; ``note`` then says why and what to pass.
    """

    state_dict: str
    family: str
    key_prefix: str
    variant: str
    pos_key: str | None
    """The absolute position table, or ``None`` for a model without one (rotary, relative, conditional)."""
    pos_shape: tuple[int, ...] | None
    patch_key: str
    patch_shape: tuple[int, ...]
    dtype: str
    prefix_keys: tuple[str, ...]
    prefix_rows: int
    source: Geometry | None
    geometry_from: str
    note: str | None = None
    nonfinite: dict[str, int] | None = None
    """NaN/Inf counts of the position table and patch kernel (``inspect`` only; ``None`` = not read)."""
    native_method: str = "timm"
    stem: str | None = None
    """What runs before the patch kernel, for a model whose patch is not its kernel (a hybrid's CNN, Hiera's
    strided stem): its patch is the stride, ``source.patch``, known only when ``stride_known``."""
    stride_known: bool = True
    """``False`` when a stem's stride was not given (``--from-img-size``, a config.json): ``source.patch`` is then
    the kernel, and the image size unknown."""
    grid_known: bool = True
    """``False`` for a model whose weights depend on no grid (RoPE) when no grid was given: ``source.grid`` is
    then ``(0, 0)``, and the image size unknown."""
    tied: tuple[tuple[str, Rule, tuple[int, ...], str], ...] = ()
    """The other tensors tied to the grid or window: ``(key, rule, shape, dtype)``."""
    window: Size | None = None
    """The attention window of the relative tables that span one (Swin), read from their shape."""

    @property
    def scheme(self) -> Scheme:
        """How the model encodes positions: ``absolute`` when it has a table, else its family's scheme."""
        return "absolute" if self.pos_key is not None else KEYMAPS[self.family].scheme

    @property
    def scheme_text(self) -> str:
        """The scheme in words for users: what it is, and what a new image size does to it."""
        km = KEYMAPS[self.family]
        parts = []
        if self.pos_key is not None and self.pos_shape is not None:
            parts.append(f"absolute table {list(self.pos_shape)}")
        rels = [t for t in self.tied if t[1].op in RELATIVE_OPS]
        if rels:
            span = f"window {format_size(self.window)}" if self.window else "the grid"
            parts.append(f"{len(rels)} relative table(s) spanning {span}")
        if km.scheme_note and self.pos_key is None:
            parts.append(km.scheme_note)
        return "; ".join(parts) or km.scheme

    @property
    def pos_layout(self) -> PosLayout:
        """``"1LD"``, or ``"LD"`` for a 2-D table (CLIP): the family's."""
        return KEYMAPS[self.family].pos_layout

    @property
    def patch_layout(self) -> PatchLayout:
        """``"OIHW"``, or ``"HWIO"`` (JAX): the family's."""
        return KEYMAPS[self.family].patch_layout

    @property
    def anchor_key(self) -> str:
        """The key the model was found by (its table, else its kernel), for messages."""
        return self.pos_key if self.pos_key is not None else self.patch_key

    @property
    def img_size(self) -> Size | None:
        """The source image size, where the weights (or the options) tell it."""
        g = self.source
        return g.img_size if g is not None and self.stride_known and self.grid_known else None

    @property
    def kernel(self) -> Size:
        """The source patch size, read from the kernel's shape."""
        return kernel_size(self.patch_shape, self.patch_layout)

    def to_dict(self) -> dict[str, Any]:
        g = self.source
        return {
            "state_dict": self.state_dict,
            "family": self.family,
            "variant": self.variant,
            "key_prefix": self.key_prefix,
            "scheme": self.scheme,
            "scheme_text": self.scheme_text,
            "pos_embed": None
            if self.pos_key is None or self.pos_shape is None
            else {"key": self.pos_key, "shape": list(self.pos_shape), "prefix_rows": self.prefix_rows},
            "patch_embed": {"key": self.patch_key, "shape": list(self.patch_shape)},
            "tied": [{"key": k, "op": r.op, "shape": list(shape)} for k, r, shape, _ in self.tied],
            "window": size_list(self.window),
            "dtype": self.dtype,
            "prefix_tokens": list(self.prefix_keys),
            "grid": size_list(g.grid) if g and self.grid_known else None,
            "patch": size_list(g.patch if g else self.kernel) if self.stride_known else None,
            "img_size": size_list(self.img_size),
            "stem": self.stem,
            "geometry_from": self.geometry_from,
            "note": self.note,
            "nonfinite": self.nonfinite,
        }


@dataclass(frozen=True)
class TensorChange:
    """A tensor that the conversion rewrites, with its shape before and after."""

    state_dict: str
    key: str
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    dtype: str
    op: Op
    detail: str
    spans: tuple[Size, Size] | None = None
    """The grid or window a tied table spans, before and after (``None`` for the position table and kernel)."""
    extra_rows: int = 0
    """Rows kept as they are: after a relative table's positions (BEiT's class rows), before an extra absolute
    table's grid (its prefix rows); or an index's class token (1)."""
    layout: str = ""
    """The layout of an extra absolute table (``abs_table``: a :data:`~vitresize.keymaps.base.PosLayout`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "state_dict": self.state_dict,
            "key": self.key,
            "old_shape": list(self.old_shape),
            "new_shape": list(self.new_shape),
            "dtype": self.dtype,
            "op": self.op,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class ModelPlan:
    """One ViT and the geometry it is moved to."""

    embedding: Embedding
    target: Geometry
    window: Size | None = None
    """The attention window the model's windowed tables move to (``None``: it has none)."""

    @property
    def source(self) -> Geometry:
        """The source geometry (known for every planned model)."""
        assert self.embedding.source is not None
        return self.embedding.source

    def to_dict(self) -> dict[str, Any]:
        d = self.embedding.to_dict()
        known = self.embedding.stride_known
        d.update(
            new_grid=size_list(self.target.grid) if self.target.grid != (0, 0) else None,
            new_window=size_list(self.window),
            new_patch=size_list(self.target.patch) if known else None,
            new_img_size=size_list(self.target.img_size) if known else None,
        )
        return d


@dataclass(frozen=True)
class Plan:
    """A conversion worked out from the file's shapes alone; :meth:`execute` carries it out.

    Build one with :func:`vitresize.plan`. It holds the opened source; use it as a context manager or
    call :meth:`close` when done (``execute`` does not close it, so a plan can be inspected after).
    """

    src: Path
    src_format: str
    target: Target
    """The geometry asked for."""
    options: Options
    """The options asked for (``options.method`` may be ``"native"``; :attr:`method` is what it stands for)."""
    method: str
    """The interpolation convention used: a key of :data:`~vitresize.resample.conventions.METHODS`."""
    pos_convention: Convention
    patch_convention: Convention
    models: tuple[ModelPlan, ...]
    changes: tuple[TensorChange, ...]
    num_tensors: int
    warnings: tuple[str, ...] = ()
    checkpoint: Checkpoint | None = field(default=None, repr=False, compare=False)

    @property
    def patch_method(self) -> str:
        """How the patch kernel is resized: ``"pi"`` or ``"interp"``."""
        return self.options.patch_method

    @property
    def device(self) -> str:
        """Where the resampling runs."""
        return self.options.device

    @property
    def allow_large(self) -> bool:
        """Whether the size budgets are lifted (see :mod:`vitresize.budgets`)."""
        return self.options.allow_large

    @property
    def family(self) -> str:
        """The families of the ViTs found, comma-separated."""
        return ", ".join(dict.fromkeys(m.embedding.family for m in self.models))

    @property
    def state_dicts(self) -> tuple[str, ...]:
        """The state dicts that hold a ViT (all of them are converted)."""
        return tuple(dict.fromkeys(m.embedding.state_dict for m in self.models))

    @property
    def passed_through(self) -> int:
        """Tensors of the converted state dicts written byte for byte."""
        return self.num_tensors - len(self.changes)

    def execute(
        self,
        dst: str | os.PathLike[str],
        *,
        force: bool = False,
        dry_run: bool = False,
        select: str | None = None,
        verify: bool = False,
        fsync: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> Report:
        """Resample the planned tensors and write ``dst`` atomically; see :func:`vitresize.convert` for the
        arguments. With ``dry_run``, check the destination and the selection only.

        Raises:
            ValueError: the plan is closed.
            UsageError: a ``.safetensors`` output would be over the size budget (see :func:`vitresize.plan`).
        """
        if self.checkpoint is None or self.checkpoint.closed:
            raise ValueError(
                f"this Plan of {self.src} is closed (close() was called, or its with block ended); "
                f"call execute() before closing it, or make a new plan"
            )
        from ._execute import execute

        return execute(
            self, Path(dst), force=force, dry_run=dry_run, select=select, verify=verify, fsync=fsync, progress=progress
        )

    def resampled(self) -> dict[tuple[str, str], Any]:
        """The planned tensors resampled, in memory: ``{(state_dict, key): tensor}`` (what :meth:`execute` would
        write for them; every other tensor stays as it is in the source). ``vitresize check`` builds its
        reference conversions with it.

        Raises:
            ValueError: the plan is closed.
        """
        if self.checkpoint is None or self.checkpoint.closed:
            raise ValueError(f"this Plan of {self.src} is closed; call resampled() before closing it")
        from ._execute import resample

        return resample(self, self.checkpoint)[0]

    def close(self) -> None:
        """Close the source; :meth:`execute` cannot be called after."""
        if self.checkpoint is not None:
            self.checkpoint.close()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def to_dict(self) -> dict[str, Any]:
        first = self.models[0]
        known = first.embedding.stride_known
        return {
            "src": str(self.src),
            "src_format": self.src_format,
            "family": self.family,
            "method": self.method,
            "interpolation": self.pos_convention.interpolation,
            "antialias": self.pos_convention.antialias,
            "align_corners": self.pos_convention.align_corners,
            "patch_method": self.patch_method,
            "patch_basis": {
                "interpolation": self.patch_convention.interpolation,
                "antialias": self.patch_convention.antialias,
            },
            "device": self.device,
            "scheme": first.embedding.scheme,
            "old_grid": size_list(first.source.grid) if first.embedding.grid_known else None,
            "new_grid": size_list(first.target.grid) if first.target.grid != (0, 0) else None,
            "old_window": size_list(first.embedding.window),
            "new_window": size_list(first.window),
            "old_patch": size_list(first.source.patch) if known else None,
            "new_patch": size_list(first.target.patch) if known else None,
            "old_img_size": size_list(first.embedding.img_size),
            "new_img_size": size_list(first.target.img_size) if known else None,
            "state_dicts": list(self.state_dicts),
            "models": [m.to_dict() for m in self.models],
            "changes": [c.to_dict() for c in self.changes],
            "tensors": self.num_tensors,
            "passed_through": self.passed_through,
            "warnings": list(self.warnings),
        }
