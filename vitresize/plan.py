"""What a conversion will do (:class:`Plan`), what it did (:class:`Report`), and what a file holds
(:class:`Inspection`). Frozen dataclasses with ``to_dict()`` for ``--json``. Pure Python.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .keymaps import KEYMAPS
from .keymaps.base import kernel_size
from .resample.conventions import Convention
from .resample.geometry import Geometry, Size

if TYPE_CHECKING:
    from ._verify import Verification
    from .formats import Checkpoint

__all__ = [
    "LARGE_FLOOR",
    "LARGE_RATIO",
    "MEMORY_CAP",
    "Embedding",
    "Inspection",
    "ModelPlan",
    "Plan",
    "Report",
    "StateDictSummary",
    "TensorChange",
]

JSON_SCHEMA_VERSION = 1

LARGE_RATIO = 10
"""An output more than this many times the size of its source is refused (unless ``allow_large``) ..."""
LARGE_FLOOR = 16 << 20
"""... once it is over 16 MiB: a toy model of a few kB may grow tenfold for real."""
MEMORY_CAP = 4 << 30
"""Resampled tensors and the working memory of the resampling (float32 copies, the PI-resize matrix and its
pseudo-inverse) are refused above 4 GiB (unless ``allow_large``): far beyond any real ViT's tables (ViT-g at
4096x4096 pixels needs about 2 GiB), and short of what a typo (``--img-size 100000``) would try to allocate."""


def format_bytes(n: int) -> str:
    """``40960`` -> ``"40 KiB"``, ``10**10`` -> ``"9.3 GiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" or size >= 100 else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError  # pragma: no cover


def _size(s: Size | None) -> list[int] | None:
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
    pos_key: str
    pos_shape: tuple[int, ...]
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
    position_ids_key: str | None = None
    stem: str | None = None
    """What runs before the patch kernel, for a model whose patch is not its kernel (a hybrid's CNN, Hiera's
    strided stem): its patch is the stride, ``source.patch``, known only when ``stride_known``."""
    stride_known: bool = True
    """``False`` when a stem's stride was not given (``--from-img-size``, a config.json): ``source.patch`` is then
    the kernel, and the image size unknown."""

    @property
    def pos_layout(self) -> str:
        """``"1LD"``, or ``"LD"`` for a 2-D table (CLIP): the family's."""
        return KEYMAPS[self.family].pos_layout

    @property
    def patch_layout(self) -> str:
        """``"OIHW"``, or ``"HWIO"`` (JAX): the family's."""
        return KEYMAPS[self.family].patch_layout

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
            "pos_embed": {"key": self.pos_key, "shape": list(self.pos_shape), "prefix_rows": self.prefix_rows},
            "patch_embed": {"key": self.patch_key, "shape": list(self.patch_shape)},
            "dtype": self.dtype,
            "prefix_tokens": list(self.prefix_keys),
            "grid": _size(g.grid) if g else None,
            "patch": _size(g.patch if g else self.kernel) if self.stride_known else None,
            "img_size": _size(g.img_size) if g and self.stride_known else None,
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
    op: str  # "pos_embed" | "patch_embed" | "position_ids"
    detail: str

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

    @property
    def source(self) -> Geometry:
        assert self.embedding.source is not None
        return self.embedding.source

    def to_dict(self) -> dict[str, Any]:
        d = self.embedding.to_dict()
        known = self.embedding.stride_known
        d.update(
            new_grid=_size(self.target.grid),
            new_patch=_size(self.target.patch) if known else None,
            new_img_size=_size(self.target.img_size) if known else None,
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
    method: str
    pos_convention: Convention
    patch_convention: Convention
    patch_method: str
    device: str
    models: tuple[ModelPlan, ...]
    changes: tuple[TensorChange, ...]
    num_tensors: int
    warnings: tuple[str, ...] = ()
    checkpoint: Checkpoint | None = field(default=None, repr=False, compare=False)
    allow_large: bool = False
    """Lift the size budgets (:data:`LARGE_RATIO`, :data:`MEMORY_CAP`); see :func:`vitresize.plan`."""

    @property
    def family(self) -> str:
        return ", ".join(dict.fromkeys(m.embedding.family for m in self.models))

    @property
    def state_dicts(self) -> tuple[str, ...]:
        """The state dicts that hold a ViT (all of them are converted)."""
        return tuple(dict.fromkeys(m.embedding.state_dict for m in self.models))

    @property
    def passed_through(self) -> int:
        return self.num_tensors - len(self.changes)

    def execute(
        self,
        dst: str | os.PathLike[str],
        *,
        force: bool = False,
        select: str | None = None,
        verify: bool = False,
        fsync: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> Report:
        """Resample the planned tensors and write ``dst`` atomically; see :func:`vitresize.convert`.

        Raises:
            UsageError: a ``.safetensors`` output would be over the size budget (see :func:`vitresize.plan`).
        """
        from ._execute import execute

        return execute(self, Path(dst), force=force, select=select, verify=verify, fsync=fsync, progress=progress)

    def close(self) -> None:
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
            "old_grid": _size(first.source.grid),
            "new_grid": _size(first.target.grid),
            "old_patch": _size(first.source.patch) if known else None,
            "new_patch": _size(first.target.patch) if known else None,
            "old_img_size": _size(first.source.img_size) if known else None,
            "new_img_size": _size(first.target.img_size) if known else None,
            "state_dicts": list(self.state_dicts),
            "models": [m.to_dict() for m in self.models],
            "changes": [c.to_dict() for c in self.changes],
            "tensors": self.num_tensors,
            "passed_through": self.passed_through,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class Report:
    """What :meth:`Plan.execute` did (or, for a dry run, would do)."""

    plan: Plan
    dst: Path
    dst_format: str
    dry_run: bool
    bytes_written: int
    written_state_dicts: tuple[str, ...]
    left_out: tuple[str, ...]
    warnings: tuple[str, ...]
    passed_through: int
    """Tensors written byte for byte (in the state dicts written)."""
    verified: Verification | None = None
    """With ``verify=True``: the pass-through tensors re-read from the output and found identical."""
    rewritten: tuple[str, ...] = ()
    """Folder output: the files written anew (shards holding a changed tensor, the index)."""
    copied: tuple[str, ...] = ()
    """Folder output: the files copied as they are."""
    engine: str | None = None
    """What resampled the tensors: ``"numpy"`` (torch not imported; bit for bit as torch's kernel, see
    :mod:`vitresize.resample.torchfree`) or ``"torch"``; ``None`` when nothing was resampled."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema": JSON_SCHEMA_VERSION, "command": "convert"}
        d.update(self.plan.to_dict())
        d.update(
            dst=str(self.dst),
            dst_format=self.dst_format,
            dry_run=self.dry_run,
            bytes_written=self.bytes_written,
            written_state_dicts=list(self.written_state_dicts),
            passed_through=self.passed_through,
            left_out=list(self.left_out),
            warnings=list(self.warnings),
            verified=self.verified.to_dict() if self.verified else None,
            engine=self.engine,
            files={"rewritten": list(self.rewritten), "copied": list(self.copied)}
            if self.dst_format == "folder"
            else None,
        )
        return d


@dataclass(frozen=True)
class StateDictSummary:
    """Counts for one state dict of a file."""

    name: str
    tensors: int
    parameters: int
    dtypes: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tensors": self.tensors, "parameters": self.parameters, "dtypes": self.dtypes}


@dataclass(frozen=True)
class Inspection:
    """What :func:`vitresize.inspect` found in a file."""

    path: Path
    format: str
    size_bytes: int
    metadata: dict[str, str]
    state_dicts: tuple[StateDictSummary, ...]
    extras: tuple[str, ...]
    embeddings: tuple[Embedding, ...]
    warnings: tuple[str, ...] = ()
    config: dict[str, Any] | None = None
    """The sidecar ``config.json`` read: ``{"path", "kind", "img_size", "patch"}``."""

    @property
    def family(self) -> str | None:
        fams = dict.fromkeys(e.family for e in self.embeddings)
        return ", ".join(fams) if fams else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": JSON_SCHEMA_VERSION,
            "command": "inspect",
            "path": str(self.path),
            "format": self.format,
            "size_bytes": self.size_bytes,
            "family": self.family,
            "metadata": self.metadata,
            "state_dicts": [s.to_dict() for s in self.state_dicts],
            "extras": list(self.extras),
            "tensors": sum(s.tensors for s in self.state_dicts),
            "parameters": sum(s.parameters for s in self.state_dicts),
            "models": [e.to_dict() for e in self.embeddings],
            "config": self.config,
            "warnings": list(self.warnings),
        }
