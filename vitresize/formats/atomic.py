"""Atomic output: write a temp file beside the destination, ``os.replace`` it; clean up on any failure.

Readers never see a partial DST. With ``fsync`` the data and the rename are also flushed to disk before
returning (durable across a power loss), which costs about as much as the copy itself on big files; like
``cp``, ``torch.save`` and safetensors, the default leaves flushing to the kernel.

Paths are checked before anything is written: DST may not hold SRC nor lie inside a SRC folder, as written,
links resolved, and by identity (``st_dev``/``st_ino``, so a bind mount or a case-insensitive file system
cannot alias one into the other) (:func:`check_apart`); DST equal to SRC (``--force``) is an atomic replace.
A DST that is a symlink, dangling or not, to a file or to a folder, exists: ``--force`` replaces the link itself
(by a file or a folder), never the file or folder it points to, which is never written through. Temp and backup
names (``.NAME.XXXXXXXX.vitresize-tmp``/``-old``, NAME cut to :data:`TMP_NAME_BYTES`) live beside DST, never
inside it, and are removed on success and on every failure, read-only folders inside included (:func:`_remove`);
what cannot be removed is reported. Outputs get their source's permission bits, never wider
(``mode & 0o777 & ~umask``); a folder output's folders get theirs last, after its files are written and flushed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError, OutputExistsError, UsageError, VitresizeError, param

__all__ = [
    "atomic_folder",
    "atomic_path",
    "check_apart",
    "check_destination",
    "check_folder_destination",
    "check_not_holding",
]

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


def _identity(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what ``path`` leads to, ``None`` if nothing (readable) is there."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _folder_identity(path: Path, *, follow: bool) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of a folder at ``path`` (with ``follow=False``, not through a link there)."""
    try:
        st = path.stat(follow_symlinks=follow)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _ancestors(path: Path) -> list[Path]:
    """The folders above ``path``, as written (absolute) and with links resolved; the nearest first."""
    written = Path(os.path.normpath(path.absolute()))
    return list(dict.fromkeys([*written.parents, *_resolved(path).parents]))


def check_apart(src: Path, dst: Path) -> None:
    """Refuse a DST that is a folder above SRC or lies inside a SRC folder, as written, with links resolved and
    by identity (``st_dev``/``st_ino``: a bind mount, or a case-insensitive file system, can give one folder two
    paths): writing it would delete the input, or put the output inside it. DST equal to SRC is allowed (an
    atomic replace with ``force``)."""
    _lstat(dst)  # a name the file system cannot hold: one line, before resolving it
    srcs = {Path(os.path.normpath(src.absolute())), _resolved(src)}
    # DST as written, through the links of its folder, and where DST itself leads if it is a link.
    dsts = {Path(os.path.normpath(dst.absolute())), _resolved(dst.parent) / dst.name, _resolved(dst)}
    above = f"DST {dst} is a folder above SRC {src}; writing it would delete the input: give a DST outside it"
    inside = f"DST {dst} is inside the input folder {src}; give a DST outside it"
    for s in srcs:
        for d in dsts:
            if d in s.parents:
                raise UsageError(above)
            if s in d.parents:
                raise UsageError(inside)
    # By identity: an existing folder DST (or one DST links to) must not be any folder above SRC ...
    dst_ids = {_folder_identity(dst, follow=False), _folder_identity(dst, follow=True)} - {None}
    if dst_ids and any(_identity(a) in dst_ids for a in _ancestors(src)):
        raise UsageError(above)
    # ... and no existing folder above DST may be a SRC folder.
    src_id = _folder_identity(src, follow=True)
    if src_id is not None and any(_identity(a) == src_id for a in _ancestors(dst)):
        raise UsageError(inside)


def check_not_holding(folder: Path, dst: Path, what: str) -> None:
    """Refuse a DST that is ``folder``, lies inside it or holds it: a folder the input reads from through links
    (a Hugging Face cache's ``blobs/``), which writing DST would change or delete."""
    if _folder_identity(dst, follow=True) == _folder_identity(folder, follow=True) is not None or (
        _resolved(dst) == _resolved(folder)
    ):
        raise UsageError(f"DST {dst} is {folder}, which {what}; give a DST outside it")
    check_apart(folder, dst)


def _exists(dst: Path, st: os.stat_result, fix: str) -> OutputExistsError:
    if stat.S_ISLNK(st.st_mode):
        return OutputExistsError(
            f"{dst} already exists (a link to {dst.readlink()}); pass {param('force', True)} to replace the link"
        )
    return OutputExistsError(f"{dst} already exists; pass {param('force', True)} to {fix}")


def check_destination(dst: Path, *, force: bool) -> None:
    """Refuse an existing destination without ``force``, a folder, or a missing parent folder. A link is never
    followed: whatever it leads to (a folder too), it exists, and with ``force`` is replaced as a link."""
    st = _lstat(dst)  # a link is not followed: whatever it leads to, it is replaced as a link (with force)
    if st is not None and stat.S_ISDIR(st.st_mode):
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


_PROC_STATUS = "/proc/self/status"


def _umask() -> int:
    """The process's umask, read from ``/proc/self/status`` (Linux 4.7+) without changing it; where that cannot
    be read, by setting and restoring it once (briefly 0 for the whole process), then cached."""
    try:
        with open(_PROC_STATUS, "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_once()


@functools.cache
def _umask_once() -> int:
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


def check_folder_destination(dst: Path, *, force: bool, file_suffixes: tuple[str, ...] = ()) -> None:
    """For a folder output: refuse an existing file, a name ending in one of ``file_suffixes`` (a file format's),
    an existing folder without ``force``, a missing parent. A link is never followed: whatever it leads to (a
    file too), it exists, and with ``force`` is replaced as a link."""
    st = _lstat(dst)  # a link is not followed: whatever it leads to, it is replaced as a link (with force)
    if st is not None and not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        raise CheckpointFormatError(f"{dst} is a file; a model folder converts to a folder: give a folder name")
    if dst.suffix.lower() in file_suffixes:
        raise UsageError(
            f"a model folder converts to a folder, not to a {dst.suffix} file; give a folder name for DST "
            f"(or convert one weights file of the folder on its own)"
        )
    if st is not None and not force:
        raise _exists(dst, st, "replace it")
    if not dst.parent.is_dir():
        raise CheckpointFormatError(f"output folder {dst.parent} does not exist; create it first")


def _make_ours(folder: Path) -> None:
    """Give the owner read, write and search rights on a folder (not through a link)."""
    st = folder.lstat()
    if stat.S_ISDIR(st.st_mode):
        folder.chmod(stat.S_IMODE(st.st_mode) | stat.S_IRWXU)


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a folder with everything in it, links inside never
    followed. A folder inside that cannot be read or emptied (a read-only copy of a read-only source folder)
    is made ``u+rwx`` and the removal retried; the folders holding ``path`` are never changed. Nothing
    there: nothing to do.

    Raises:
        OSError: ``path`` could not be removed, not all of it (not the owner, an I/O error); what is left stays.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
        return
    top = os.fspath(path)
    retried: set[tuple[Any, str]] = set()

    def retry(func: Callable[..., Any], name: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return
        if not isinstance(exc, PermissionError) or (func, name) in retried:
            raise exc
        retried.add((func, name))
        if name != top:
            _make_ours(Path(name).parent)  # to unlink or rmdir in it, or look at its entries
        st = os.lstat(name)
        if stat.S_ISDIR(st.st_mode) and func is not os.rmdir:  # it could not be opened or listed
            _make_ours(Path(name))
            rmtree(name)
        else:
            func(name)  # os.unlink / os.rmdir, in a folder now writable

    def rmtree(name: str) -> None:
        if sys.version_info >= (3, 12):
            shutil.rmtree(name, onexc=retry)
        else:
            shutil.rmtree(name, onerror=lambda func, p, info: retry(func, p, info[1]))

    try:
        rmtree(top)
    except RecursionError:  # before Python 3.13 rmtree recurses: a folder nested ~1000 deep
        raise OSError(errno.EMLINK, "nested too deeply to remove", top) from None
    if os.path.lexists(top):
        raise OSError(errno.ENOTEMPTY, "could not be removed", top)


def _reason(e: BaseException) -> str:
    return (e.strerror or str(e)) if isinstance(e, OSError) else str(e)


def _discard(tmp: Path, dst: Path, error: BaseException) -> None:
    """Remove a temp output after ``error``; if that fails too, raise one line that says both (a
    ``KeyboardInterrupt`` or a bug keeps its own)."""
    try:
        _remove(tmp)
    except OSError as e:
        if not isinstance(error, (OSError, VitresizeError)):
            return
        what = error.message.raw if isinstance(error, VitresizeError) else f"cannot write {dst}: {_reason(error)}"
        raise CheckpointFormatError(
            f"{what}; the temp folder {tmp} is left behind ({_reason(e)}): remove it by hand"
        ) from error


def _seal(tmp: Path, *, fsync: bool, mode: int, folder_modes: Mapping[str, int]) -> None:
    """Flush a built folder's files (``fsync``), then give its folders their modes, children first (so a read-only
    folder is closed only once it is filled and flushed), each flushed after (its entries and its mode).
    Walked with an explicit stack, links never followed."""
    folders: list[tuple[Path, int | None]] = []  # parents before their children
    stack: list[tuple[Path, int | None]] = [(tmp, mode)]
    while stack:
        folder, folder_mode = stack.pop()
        folders.append((folder, folder_mode))
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=False):
                    rel = Path(entry.path).relative_to(tmp).as_posix()
                    stack.append((Path(entry.path), folder_modes.get(rel)))
                elif fsync and entry.is_file(follow_symlinks=False):
                    _fsync(Path(entry.path))
    for folder, folder_mode in reversed(folders):
        fd = os.open(folder, os.O_RDONLY) if fsync else None  # opened before a mode may close it to reading
        try:
            if folder_mode is not None:
                folder.chmod(folder_mode)
            if fd is not None:
                with contextlib.suppress(OSError):  # some file systems cannot fsync a folder
                    os.fsync(fd)
        finally:
            if fd is not None:
                os.close(fd)


@contextlib.contextmanager
def atomic_folder(
    dst: Path,
    *,
    force: bool,
    fsync: bool = False,
    mode: int | None = None,
    folder_modes: Mapping[str, int] | None = None,
) -> Iterator[Path]:
    """Yield a temp folder beside ``dst``; on success it takes ``dst``'s place, on failure it is removed.

    An existing ``dst`` (with ``force``) is renamed aside, the new folder renamed in, and the old one removed:
    two renames, so a crash between them leaves the old folder as ``.NAME.*.vitresize-old`` (a failed second
    rename puts it back). A ``dst`` that is a symlink is replaced by the folder; what it points to is left alone.

    Args:
        mode: the source folder's ``st_mode``: the output folder gets its permission bits (``& ~umask``).
        folder_modes: the ``st_mode`` of the source's subfolders by relative path (``sub/name``): the output's
            get their permission bits (``& ~umask``), after its files are written (and flushed).

    Raises:
        CheckpointFormatError: the new folder is in place but the old one could not be removed, or a failure's
            temp folder could not be removed (the line names what is left).
    """
    check_folder_destination(dst, force=force)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(dst), suffix=TMP_SUFFIX, dir=dst.parent))
    try:
        yield tmp
        modes = {name: permissions(m, 0o777) for name, m in (folder_modes or {}).items()}
        _seal(tmp, fsync=fsync, mode=permissions(mode, 0o777), folder_modes=modes)
        if os.path.lexists(dst):
            old = Path(tempfile.mkdtemp(prefix=_prefix(dst), suffix=OLD_SUFFIX, dir=dst.parent))
            old.rmdir()
            dst.rename(old)
            try:
                tmp.rename(dst)
            except BaseException:
                old.rename(dst)
                raise
            try:
                _remove(old)
            except OSError as e:
                raise CheckpointFormatError(
                    f"wrote {dst}, but its old content, moved aside to {old}, could not be removed "
                    f"({_reason(e)}): remove it by hand"
                ) from None
        else:
            tmp.rename(dst)
        if fsync:
            _fsync(dst.parent)
    except BaseException as e:
        _discard(tmp, dst, e)  # nothing to do once it is DST
        raise
