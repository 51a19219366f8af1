"""The two interfaces every format implements: a :class:`Checkpoint` (reader) hands out the tensors of its state
dicts as :class:`Segment` objects, a :class:`Writer` takes them with the :class:`Replacement` tensors and streams
an output. Pure Python; tensors are only touched through these objects.

A segment is one tensor of a state dict: its dtype, shape and size, where its bytes lie untouched in a file
(``source``, when they do) and how to produce it (``load``). A writer that stores raw bytes (safetensors) copies
the sources file to file and calls ``load`` for the rest; one that serializes objects (``torch.save``) calls
``load`` on every segment; ``--verify`` hashes the sources, or the loaded tensors' bytes.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

from ..keymaps import TensorInfo
from ._dtypes import nbytes
from .atomic import atomic_path, check_destination

if TYPE_CHECKING:
    import torch

    from ._copy import Progress
    from .sidecar import Sidecar

__all__ = [
    "ROOT",
    "Checkpoint",
    "Key",
    "Replacement",
    "Segment",
    "TensorPath",
    "WriteJob",
    "Writer",
    "Written",
    "nonfinite",
    "replaced_segments",
]

ROOT = ""
"""Name of the state dict when the file is a flat state dict (no container around it)."""

Key = tuple[str, str]
"""A tensor by ``(state dict, key)``."""
TensorPath = tuple[Any, ...]
"""A tensor by the keys that lead to it from the file's root object (``("model", "pos_embed")``)."""


def nonfinite(t: torch.Tensor) -> int:
    """NaN and Inf elements of a tensor (0 for integer dtypes)."""
    import torch

    if not t.is_floating_point():
        return 0
    if t.element_size() == 1:  # float8: torch.isfinite has no kernel for some of them; every value fits float32
        t = t.float()
    return int((~torch.isfinite(t)).sum())


@dataclass(frozen=True)
class Segment:
    """One tensor as readers hand it out and writers take it.

    Attributes:
        key: its key in the state dict.
        dtype: torch's name of its dtype (``"float32"``).
        shape: its shape.
        nbytes: its size in bytes, stored contiguously.
        load: produces the tensor (a ``torch.Tensor``, or a numpy-held ``resample.torchfree.Table``), reading or
            computing it only when called.
        source: ``(file, offset)`` where its ``nbytes`` bytes lie as they are (little-endian, contiguous), for a
            writer to copy without decoding; ``None`` when they do not (a compressed member, a view).
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    load: Callable[[], Any]
    source: tuple[Path, int] | None = None


@dataclass(frozen=True)
class Replacement:
    """A tensor the conversion rewrites: its new dtype and shape, known before ``load`` computes it."""

    dtype: str
    shape: tuple[int, ...]
    load: Callable[[], Any]


def replaced_segments(ckpt: Checkpoint, state_dict: str, replacements: Mapping[Key, Replacement]) -> list[Segment]:
    """The segments of one state dict, the replaced ones produced by their :class:`Replacement`."""
    out = []
    for s in ckpt.segments(state_dict):
        r = replacements.get((state_dict, s.key))
        out.append(s if r is None else Segment(s.key, r.dtype, r.shape, nbytes(r.shape, r.dtype), r.load))
    return out


class Checkpoint(ABC):
    """An opened checkpoint (the reader interface): its state dicts' shapes and dtypes, read without
    materializing tensor data, and their tensors as :class:`Segment` objects.

    Attributes:
        path: the file (or folder).
        format: ``"safetensors"``, ``"torch-zip"``, ``"torch-legacy"``, ``"npz"``, or a folder's kind.
        writer: the output format that writes this kind of file (a model folder writes each file in its own).
        magic: the bytes its files start with, if it has such a signature.
        metadata: string metadata stored in the file (safetensors ``__metadata__``), else empty.
        state_dicts: every model-like dict, by name (``"model"``, ``"model_ema"``; ``""`` for a flat file),
            mapping keys to :class:`TensorInfo`.
        extras: container entries that are not state dicts (``epoch``, ``args``, ``optimizer``, ...).
        lazy: tensor data is read on demand (safetensors, torch zip via mmap), not all loaded up front.
        sidecar: the ``config.json`` beside the file (or in the folder), set by
            :func:`~vitresize.formats.open_checkpoint`.
    """

    path: Path
    format: str
    writer: ClassVar[str]
    magic: ClassVar[bytes] = b""
    """The bytes a file of this format starts with, for :func:`~vitresize.formats.sniff` (empty for the formats
    it tells apart by their structure: safetensors, torch pickles, zip archives)."""
    metadata: dict[str, str]
    state_dicts: dict[str, dict[str, TensorInfo]]
    extras: list[str]
    lazy: bool
    sidecar: Sidecar | None = None
    closed: bool = False
    """Whether :meth:`close` was called: the checkpoint's tensors can no longer be read."""

    @abstractmethod
    def tensor(self, state_dict: str, key: str) -> torch.Tensor:
        """Materialize one tensor on the CPU."""

    def segments(self, state_dict: str) -> list[Segment]:
        """The tensors of one state dict, in the order a writer should store them. By default each one is
        loaded with :meth:`tensor` when it is needed; a format whose bytes lie as they are gives ``source``."""
        return [
            Segment(key, info.dtype, info.shape, nbytes(info.shape, info.dtype), _loader(self, state_dict, key))
            for key, info in self.state_dicts[state_dict].items()
        ]

    def tensors(self) -> dict[TensorPath, Segment]:
        """Every tensor of the file by its path from the root object (``--verify`` compares them). By default the
        tensors of the state dicts; a container format adds the others (optimizer moments, ...)."""
        return {self.tensor_path(sd, s.key): s for sd in self.state_dicts for s in self.segments(sd)}

    def tensor_path(self, state_dict: str, key: str) -> TensorPath:
        """The path under which :meth:`tensors` lists a tensor of a state dict."""
        return (key,) if state_dict == ROOT else (*state_dict.split("/"), key)

    def replaced(self, replacements: Mapping[str, Mapping[str, Any]]) -> Any:
        """The whole content as one object for ``torch.save``: each state dict's tensors (the ``replacements``
        instead of theirs, by state dict and key), nested as in the file. By default a flat dict."""
        new = replacements.get(ROOT, {})
        return {s.key: new[s.key] if s.key in new else s.load() for s in self.segments(ROOT)}

    def left_out(self, state_dict: str) -> list[str]:
        """What an output holding only ``state_dict`` leaves out of this file (other entries of a container)."""
        return []

    @property
    def size_bytes(self) -> int:
        """The bytes of the checkpoint (of all its files, for a folder)."""
        return self.path.stat().st_size

    def source_files(self) -> tuple[Path, ...]:
        """The files reading this checkpoint opens (a model folder's, links resolved)."""
        return (self.path,)

    def count_nonfinite(self, state_dict: str, key: str) -> int:
        """NaN and Inf elements of one tensor (0 for integer dtypes)."""
        return nonfinite(self.tensor(state_dict, key))

    def raw_bytes(self, state_dict: str, key: str) -> bytes | None:
        """One tensor's little-endian bytes read without torch, or ``None`` where the format cannot."""
        return None

    def close(self) -> None:
        """Release file handles and mappings; the checkpoint cannot be read after."""
        self.closed = True
        self._release()

    def _release(self) -> None:  # noqa: B027 - optional hook
        """What a format releases on :meth:`close`."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _loader(ckpt: Checkpoint, state_dict: str, key: str) -> Callable[[], Any]:
    return lambda: ckpt.tensor(state_dict, key)


@dataclass(frozen=True)
class WriteJob:
    """What a writer writes.

    Attributes:
        checkpoint: the input.
        state_dicts: the state dicts to write: one for a writer that stores a flat state dict, all of them for
            one that keeps the container.
        replacements: the tensors that change, by ``(state dict, key)``, computed when loaded.
        metadata: string metadata to store where the format has a place for it (provenance).
        geometry: ``(image size, patch)`` to write into a model folder's ``config.json``, or ``None`` to copy it.
        window: a new attention window to write there too (Swin), or ``None``.
        patch_changed: whether the patch changes (a config that does not state one gets it only then).
    """

    checkpoint: Checkpoint
    state_dicts: tuple[str, ...]
    replacements: Mapping[Key, Replacement]
    metadata: Mapping[str, str]
    geometry: tuple[tuple[int, int], tuple[int, int]] | None = None
    window: tuple[int, int] | None = None
    patch_changed: bool = True


@dataclass(frozen=True)
class Written:
    """What a writer wrote: bytes, and for a folder the files written anew and those copied as they are."""

    bytes: int
    rewritten: tuple[str, ...] = ()
    copied: tuple[str, ...] = ()


class Writer(ABC):
    """An output format (the writer interface): which destinations it claims, what it keeps, and how it writes.

    Attributes:
        format: its name in reports (``"safetensors"``).
        suffixes: the destination extensions it is chosen for (lower case, with the dot).
        whole_container: it writes every state dict with the file's nesting (a ``.pth``), not one flat state dict.
        keeps_metadata: it stores the input's string metadata.
        stores_every_element: it stores every element of a broadcast or shared tensor in full (so its output size
            is checked against the budget before writing).
    """

    format: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()
    whole_container: ClassVar[bool] = False
    keeps_metadata: ClassVar[bool] = False
    stores_every_element: ClassVar[bool] = False

    def check_source(self, ckpt: Checkpoint) -> None:  # noqa: B027 - optional check
        """Raise :class:`~vitresize.errors.UsageError` where this format cannot hold what ``ckpt`` holds."""

    def writes_raw(self, ckpt: Checkpoint) -> bool:
        """Whether every replaced tensor is stored as raw bytes, so a numpy-held one will do (torch not needed)."""
        return False

    def check_destination(self, ckpt: Checkpoint, dst: Path, *, force: bool) -> None:
        """Refuse a destination that exists (without ``force``), or that this format cannot replace."""
        check_destination(dst, force=force)

    @contextlib.contextmanager
    def atomic(self, ckpt: Checkpoint, dst: Path, *, force: bool, fsync: bool) -> Iterator[Path]:
        """A temporary path beside ``dst`` to write, renamed into place when the block succeeds."""
        with atomic_path(dst, force=force, fsync=fsync, mode=ckpt.path.stat().st_mode) as tmp:
            yield tmp

    @abstractmethod
    def write(self, out: Path, job: WriteJob, progress: Progress | None) -> Written:
        """Write ``job`` to ``out`` (a fresh temporary path), streaming.

        Raises:
            OSError: reading the input or writing ``out`` failed.
            CheckpointFormatError: the input is corrupt, or holds what this format cannot store.
        """
