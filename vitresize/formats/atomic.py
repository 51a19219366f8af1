"""Atomic output: write a temp file beside the destination, ``os.replace`` it; clean up on any failure.

Readers never see a partial DST. With ``fsync`` the data and the rename are also flushed to disk before
returning (durable across a power loss), which costs about as much as the copy itself on big files; like
``cp``, ``torch.save`` and safetensors, the default leaves flushing to the kernel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointFormatError, OutputExistsError, UsageError

__all__ = ["atomic_folder", "atomic_path", "check_destination", "check_folder_destination"]

TMP_SUFFIX = ".vitresize-tmp"


def check_destination(dst: Path, *, force: bool) -> None:
    """Refuse an existing destination without ``force``, a folder, or a missing parent folder."""
    if dst.is_dir():
        raise CheckpointFormatError(f"{dst} is a folder; give an output file name such as {dst / 'model.safetensors'}")
    if dst.exists() and not force:
        raise OutputExistsError(f"{dst} already exists; pass --force to overwrite it")
    if not dst.parent.is_dir():
        raise CheckpointFormatError(f"output folder {dst.parent} does not exist; create it first")


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some file systems cannot fsync a folder; a file must be flushed
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dst: Path, *, force: bool, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``dst``; on success it replaces ``dst`` atomically, on failure it is removed.

    Writing over the source (``dst`` == source) is safe: the source is only unlinked by ``os.replace``
    after the output is complete, and open handles or mappings of it stay valid.
    """
    check_destination(dst, force=force)
    fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=TMP_SUFFIX, dir=dst.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())
        if fsync:
            _fsync(tmp)
        tmp.replace(dst)
        if fsync:
            _fsync(dst.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_folder_destination(dst: Path, *, force: bool) -> None:
    """For a folder output: refuse an existing file, an existing folder without ``force``, a missing parent."""
    if dst.exists() and not dst.is_dir():
        raise CheckpointFormatError(f"{dst} is a file; a model folder converts to a folder: give a folder name")
    if dst.suffix.lower() in (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz"):
        raise UsageError(
            f"a model folder converts to a folder, not to a {dst.suffix} file; give a folder name for DST "
            f"(or convert one weights file of the folder on its own)"
        )
    if dst.exists() and not force:
        raise OutputExistsError(f"{dst} already exists; pass --force to replace it")
    if not dst.parent.is_dir():
        raise CheckpointFormatError(f"output folder {dst.parent} does not exist; create it first")


@contextlib.contextmanager
def atomic_folder(dst: Path, *, force: bool, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``dst``; on success it takes ``dst``'s place, on failure it is removed.

    An existing ``dst`` (with ``force``) is renamed aside, the new folder renamed in, and the old one removed:
    two renames, so a crash between them leaves the old folder as ``.NAME.*.vitresize-old``.
    """
    check_folder_destination(dst, force=force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=TMP_SUFFIX, dir=dst.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())
        if fsync:
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync(f)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".vitresize-old", dir=dst.parent))
            old.rmdir()
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
        if fsync:
            _fsync(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
