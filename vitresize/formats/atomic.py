"""Atomic output: write a temp file beside the destination, ``os.replace`` it; clean up on any failure.

Readers never see a partial DST. With ``fsync`` the data and the rename are also flushed to disk before
returning (durable across a power loss), which costs about as much as the copy itself on big files; like
``cp``, ``torch.save`` and safetensors, the default leaves flushing to the kernel.

Paths are checked before anything is written: DST may not hold SRC nor lie inside a SRC folder, links
resolved (:func:`check_apart`); DST equal to SRC (``--force``) is an atomic replace. A DST that is a symlink,
dangling or not, exists: ``--force`` replaces the link itself (by a file or a folder), never the file or
folder it points to. Temp and backup names (``.NAME.XXXXXXXX.vitresize-tmp``/``-old``, NAME cut to
:data:`TMP_NAME_BYTES`) live beside DST, never inside it, and are removed on success and on every failure.
Outputs get their source's permission bits, never wider (``mode & 0o777 & ~umask``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointFormatError, OutputExistsError, UsageError

__all__ = ["atomic_folder", "atomic_path", "check_apart", "check_destination", "check_folder_destination"]

TMP_SUFFIX = ".vitresize-tmp"
OLD_SUFFIX = ".vitresize-old"
TMP_NAME_BYTES = 100
"""At most this many bytes of DST's name go into a temp name, so that a DST name near the file system's limit
(255 bytes) still has room for ``.NAME.XXXXXXXX.vitresize-tmp``."""


def _prefix(dst: Path) -> str:
    name = dst.name
    while len(os.fsencode(name)) > TMP_NAME_BYTES:
        name = name[:-1]
    return f".{name}."


def _lstat(dst: Path) -> os.stat_result | None:
    """``dst``'s own status (a link is not followed), ``None`` if nothing is there; a name too long for the
    file system is a usage error, any other failure one line."""
    try:
        limit = os.pathconf(dst.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(dst.name))
    if size > limit:
        raise UsageError(f"the name of {dst} is {size} bytes, over the file system's {limit}; give a shorter DST")
    try:
        return os.lstat(dst)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise UsageError(f"{dst} is a path too long for the file system; give a shorter DST") from None
        raise CheckpointFormatError(f"cannot use {dst}: {e.strerror or e}") from None


def _resolved(path: Path) -> Path:
    """``path`` with its links resolved, as far as they resolve (a link loop is left as written)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a link loop, before Python 3.13
        return Path(os.path.normpath(path.absolute()))


def check_apart(src: Path, dst: Path) -> None:
    """Refuse a DST that is a folder above SRC or lies inside a SRC folder, as written and with links resolved:
    writing it would delete the input, or put the output inside it. DST equal to SRC is allowed (an atomic
    replace with ``force``)."""
    _lstat(dst)  # a name the file system cannot hold: one line, before resolving it
    srcs = {Path(os.path.normpath(src.absolute())), _resolved(src)}
    # DST as written, through the links of its folder, and where DST itself leads if it is a link.
    dsts = {Path(os.path.normpath(dst.absolute())), _resolved(dst.parent) / dst.name, _resolved(dst)}
    for s in srcs:
        for d in dsts:
            if d in s.parents:
                raise UsageError(
                    f"DST {dst} is a folder above SRC {src}; writing it would delete the input: give a DST outside it"
                )
            if s in d.parents:
                raise UsageError(f"DST {dst} is inside the input folder {src}; give a DST outside it")


def _exists(dst: Path, st: os.stat_result, fix: str) -> OutputExistsError:
    if stat.S_ISLNK(st.st_mode):
        return OutputExistsError(f"{dst} already exists (a link to {dst.readlink()}); pass --force to replace the link")
    return OutputExistsError(f"{dst} already exists; pass --force to {fix}")


def check_destination(dst: Path, *, force: bool) -> None:
    """Refuse an existing destination without ``force``, a folder, or a missing parent folder."""
    st = _lstat(dst)  # first: a name too long is one line, not an OSError from is_dir below
    if dst.is_dir():
        raise CheckpointFormatError(f"{dst} is a folder; give an output file name such as {dst / 'model.safetensors'}")
    if st is not None and not force:
        raise _exists(dst, st, "overwrite it")
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


def permissions(mode: int | None, default: int) -> int:
    """The permission bits of an output: its source's (``mode``, an ``st_mode``), else ``default``, never
    wider than the umask allows."""
    return (default if mode is None else mode) & 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_path(dst: Path, *, force: bool, fsync: bool = False, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``dst``; on success it replaces ``dst`` atomically, on failure it is removed.

    Writing over the source (``dst`` == source) is safe: the source is only unlinked by ``os.replace``
    after the output is complete, and open handles or mappings of it stay valid. A ``dst`` that is a symlink
    is replaced by the file; what it points to is left alone.

    Args:
        mode: the source's ``st_mode``: the output gets its permission bits (``& ~umask``), else ``0o666``
            ``& ~umask``.
    """
    check_destination(dst, force=force)
    fd, name = tempfile.mkstemp(prefix=_prefix(dst), suffix=TMP_SUFFIX, dir=dst.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(permissions(mode, 0o666))
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
    st = _lstat(dst)
    if dst.exists() and not dst.is_dir():
        raise CheckpointFormatError(f"{dst} is a file; a model folder converts to a folder: give a folder name")
    if dst.suffix.lower() in (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz"):
        raise UsageError(
            f"a model folder converts to a folder, not to a {dst.suffix} file; give a folder name for DST "
            f"(or convert one weights file of the folder on its own)"
        )
    if st is not None and not force:
        raise _exists(dst, st, "replace it")
    if not dst.parent.is_dir():
        raise CheckpointFormatError(f"output folder {dst.parent} does not exist; create it first")


def _remove(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a folder."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(dst: Path, *, force: bool, fsync: bool = False, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp folder beside ``dst``; on success it takes ``dst``'s place, on failure it is removed.

    An existing ``dst`` (with ``force``) is renamed aside, the new folder renamed in, and the old one removed:
    two renames, so a crash between them leaves the old folder as ``.NAME.*.vitresize-old`` (a failed second
    rename puts it back). A ``dst`` that is a symlink is replaced by the folder; what it points to is left alone.

    Args:
        mode: the source folder's ``st_mode``: the output folder gets its permission bits (``& ~umask``).
    """
    check_folder_destination(dst, force=force)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(dst), suffix=TMP_SUFFIX, dir=dst.parent))
    try:
        yield tmp
        tmp.chmod(permissions(mode, 0o777))
        if fsync:
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync(f)
        if os.path.lexists(dst):
            old = Path(tempfile.mkdtemp(prefix=_prefix(dst), suffix=OLD_SUFFIX, dir=dst.parent))
            old.rmdir()
            dst.rename(old)
            try:
                tmp.rename(dst)
            except BaseException:
                old.rename(dst)
                raise
            _remove(old)
        else:
            tmp.rename(dst)
        if fsync:
            _fsync(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
