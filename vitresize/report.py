"""What a conversion did (:class:`Report`), what ``--verify`` compared (:class:`Verification`), and what a file
holds (:class:`Inspection`). Frozen dataclasses with ``to_dict()`` for ``--json``. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .plans import Embedding, Plan

__all__ = ["JSON_SCHEMA_VERSION", "Inspection", "Report", "StateDictSummary", "Verification"]

JSON_SCHEMA_VERSION = 1
"""The ``schema`` of every ``--json`` object; bumped (with a CHANGELOG entry) when a key changes meaning or goes."""


@dataclass(frozen=True)
class Verification:
    """What ``--verify`` compared: pass-through tensors found byte-identical to the input."""

    tensors: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "bytes": self.bytes, "identical": True}


@dataclass(frozen=True)
class Report:
    """What :meth:`Plan.execute` did (or, for a dry run, would do)."""

    plan: Plan
    dst: Path
    dst_format: str
    """The writer's format (:data:`vitresize.options.OutputFormat` for the built-in ones)."""
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
    cloned_bytes: int | None = None
    """Bytes of the output that share their blocks with another file: cloned, not copied, by a copy-on-write file
    system (XFS with reflink, btrfs) from the source (``FS_IOC_FIEMAP``); ``None`` where that cannot be asked
    (not Linux, a dry run, a file system without FIEMAP)."""
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
            cloned_bytes=self.cloned_bytes,
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
        """The families of the ViTs found, comma-separated; ``None`` when none was."""
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
