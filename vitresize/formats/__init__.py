"""Checkpoint formats: the registry of readers and writers, and the sniffing that picks a reader.

One module per format, each with its reader (a :class:`~.base.Checkpoint`) and its writer (a
:class:`~.base.Writer`): ``safetensors``, ``torch_pickle``, ``npz``; ``folder`` reads and writes model folders
through them. Only this package reads checkpoint files (and ``_verify``, which hashes the byte ranges segments
point to). Adding a format is its module and a line in :data:`READERS` (with the bytes :func:`sniff` knows it by)
and/or :data:`WRITERS`, and a writer's name in :data:`vitresize.options.OutputFormat`.

The registries name their readers and writers by module (:class:`._registry.Registry`): a format's module is
imported when a file of that format is read, or when :func:`writer_for` tries its writer, so a safetensors
conversion never loads the pickle and zip code.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointFormatError, UnsafeCheckpointError, UsageError
from ._files import MAX_JSON_BYTES, MAX_JSON_DEPTH, describe_kind, is_folder, open_regular, read_json
from ._registry import Registry
from .base import ROOT, Checkpoint, Writer
from .sidecar import find_sidecar

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "READERS",
    "ROOT",
    "WRITERS",
    "Checkpoint",
    "Writer",
    "describe_kind",
    "open_checkpoint",
    "open_file",
    "open_regular",
    "read_json",
    "sniff",
    "writer_for",
]

READERS: Registry[Callable[[Path], Checkpoint]] = Registry(
    {
        "safetensors": ".safetensors:SafetensorsCheckpoint",
        "torch-zip": ".torch_pickle:TorchCheckpoint.zip",
        "torch-legacy": ".torch_pickle:TorchCheckpoint.legacy",
        "npz": ".npz:NpzCheckpoint",
    },
    package=__name__,
)
"""Input formats by the name :func:`sniff` gives them, each with the reader that opens it. A reader with a
:attr:`~.base.Checkpoint.magic` of its own is registered as the class itself (``READERS["toy"] = ToyCheckpoint``):
:func:`sniff` looks for the signatures of the readers it holds as objects, and imports none to do so."""

WRITERS: Registry[Writer] = Registry(
    {
        "safetensors": ".safetensors:SafetensorsWriter",
        "torch": ".torch_pickle:TorchWriter",
        "npz": ".npz:NpzWriter",
    },
    package=__name__,
    make=lambda cls: cls(),
)
"""Output formats by name (:attr:`Writer.format`); a destination's extension picks one (:attr:`Writer.suffixes`),
trying them in this order."""

FOLDER = "folder"
"""The :attr:`Checkpoint.writer` of a model folder."""


@functools.cache
def _folder_writer() -> Writer:
    """The writer of a model folder: each file rewritten in its own format (:attr:`Checkpoint.writer`)."""
    from .folder import FolderWriter

    return FolderWriter(WRITERS)


def _zip_kind(path: Path) -> str:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except Exception as e:  # zipfile raises many kinds on garbage (BadZipFile, NotImplementedError, ...)
        raise CheckpointFormatError(
            f"{path} looks like a zip archive but cannot be read: {e or type(e).__name__} (truncated or corrupt?)"
        ) from None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise UnsafeCheckpointError(
            f"{path} is a TorchScript archive, which cannot be loaded without running its code; in a trusted "
            f"environment load it and save model.state_dict() with torch.save or safetensors"
        )
    if any(n.endswith("data.pkl") for n in names):
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise CheckpointFormatError(f"{path} is a zip archive but not a torch checkpoint (no data.pkl inside)")


def sniff(path: Path) -> str:
    """The format of ``path`` from its content: a key of :data:`READERS`.

    Raises:
        CheckpointFormatError: missing, unreadable, empty, a folder, not a regular file (a FIFO, a device,
            a socket), or no known format.
    """
    if is_folder(path):
        raise CheckpointFormatError(f"{path} is a folder; pass the checkpoint file inside it")
    signed = {name: magic for name, r in READERS.loaded().items() if (magic := getattr(r, "magic", b""))}
    longest = max(map(len, signed.values()), default=0)
    with open_regular(path) as f:
        try:
            head = f.read(max(9, longest))
        except OSError as e:
            raise CheckpointFormatError(f"cannot read {path}: {e.strerror}") from None
        size = os.fstat(f.fileno()).st_size
    if not head:
        raise CheckpointFormatError(f"{path} is empty (0 bytes); re-download or re-save it")
    for name, magic in signed.items():  # a format with a signature of its own
        if head.startswith(magic):
            return name
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    # safetensors first: its 8-byte header length may start with 0x80, like a pickle.
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n <= size:
            return "safetensors"
        if head[:1] != b"\x80":
            raise CheckpointFormatError(
                f"{path} is a truncated safetensors file: its header needs {8 + n} bytes, it has {size}"
            )
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise CheckpointFormatError(
        f"{path} is not a checkpoint vitresize can read (expected safetensors or a torch .pth/.pt/.bin)"
    )


def open_file(path: Path) -> Checkpoint:
    """Open a checkpoint file (by its content, whatever its extension says) or a model folder, lazily."""
    if is_folder(path):
        from .folder import ShardedCheckpoint

        return ShardedCheckpoint(path, open_file=open_file)
    return READERS[sniff(path)](path)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint lazily, whatever its extension says (a folder: its weights files, index and config),
    with the sidecar ``config.json`` beside it, if any."""
    p = Path(path)
    ckpt = open_file(p)
    try:
        ckpt.sidecar = find_sidecar(p)
    except BaseException:
        ckpt.close()
        raise
    return ckpt


def writer_for(ckpt: Checkpoint, dst: Path) -> Writer:
    """The writer of ``dst``: a model folder for a model folder, else the one its extension names.

    Raises:
        UsageError: ``dst`` has no extension of a known format.
    """
    if ckpt.writer == FOLDER:
        return _folder_writer()
    suffix = dst.suffix.lower()
    for w in WRITERS.values():  # imported one by one until one claims the suffix
        if suffix in w.suffixes:
            return w
    known = ", ".join(s for w in WRITERS.values() for s in w.suffixes)
    raise UsageError(f"cannot tell the output format of {dst} from its extension; end it with one of {known}")
