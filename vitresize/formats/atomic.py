"""Atomic output: write a temp file beside the destination, fsync, ``os.replace``; clean up on any failure."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointFormatError, OutputExistsError

__all__ = ["atomic_path", "check_destination"]

TMP_SUFFIX = ".vitresize-tmp"


def check_destination(dst: Path, *, force: bool) -> None:
    """Refuse an existing destination without ``force``, a folder, or a missing parent folder."""
    if dst.is_dir():
        raise CheckpointFormatError(f"{dst} is a folder; give an output file name such as {dst / 'model.safetensors'}")
    if dst.exists() and not force:
        raise OutputExistsError(f"{dst} already exists; pass --force to overwrite it")
    if not dst.parent.is_dir():
        raise CheckpointFormatError(f"output folder {dst.parent} does not exist; create it first")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dst: Path, *, force: bool) -> Iterator[Path]:
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
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(dst)
        with contextlib.suppress(OSError):
            dir_fd = os.open(dst.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
