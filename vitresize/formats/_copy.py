"""The copy engine: untouched byte ranges go from source files to their places in an output, in the kernel.

Ranges are copied with ``os.copy_file_range`` where the file systems allow it (no bytes pass through this
process; a copy-on-write file system may share the blocks), else through one reusable buffer; holes in a sparse
source stay holes. The copies run in a forked child process (else a thread) beside the thread that produces the
other tensors of the output (importing torch, resampling): see :func:`start_copier`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import struct
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError

__all__ = ["Copier", "Copies", "Output", "Progress", "copy_range", "start_copier", "write_all"]

_COPY_CHUNK = 16 * 1024 * 1024  # buffered fallback
# copy_file_range: ask for as much as the kernel takes in one call (MAX_RW_COUNT), as cp does. Measured on
# this project's VM (ext4, 4 GB, medians of 5, page cache synced before each run): calls of 8 MiB to 1 GiB
# took 3.8-4.6 s where calls of 2 GiB took 1.6-1.9 s, as fast as cp; fewer calls also mean fewer GIL
# hand-overs with a main thread that is importing torch.
_COPY_CHUNK_CFR = 0x7FFFF000
_WRITE_CHUNK = 256 * 1024 * 1024  # pwrite of produced tensors
_FORK_COPIES = sys.platform == "linux" and hasattr(os, "fork") and hasattr(os, "copy_file_range")

Progress = Callable[[int], None]
"""Called with the number of bytes just written (from the writer's threads: keep it cheap and thread-safe)."""


def write_all(fd: int, data: memoryview, offset: int, progress: Progress | None = None) -> None:
    """``pwrite`` all of ``data`` at ``offset``."""
    while data:
        n = os.pwrite(fd, data[:_WRITE_CHUNK], offset)
        data = data[n:]
        offset += n
        if progress:
            progress(n)


class _Stop(Exception):
    pass


BLOCK = 4096
"""The file-system block size copies are aligned to (XFS, btrfs, ext4 and ZFS share or clone whole 4 KiB blocks;
larger blocks are multiples of it): see :func:`vitresize.formats.safetensors.congruent_start`."""


def _copy_range(
    src_fd: int,
    dst_fd: int,
    offset: int,
    length: int,
    dst_offset: int,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src_fd`` to ``dst_offset`` of ``dst_fd``, in the kernel
    (``copy_file_range``) where it can, else through a buffer; ``stop`` is checked between chunks."""
    if offset + length > os.fstat(src_fd).st_size:
        raise CheckpointFormatError("source file ended early while copying (was it truncated meanwhile?)")
    use_cfr = hasattr(os, "copy_file_range")
    run = 0  # bytes from `offset` known to be data: the hole map is asked once per data run, not per chunk
    buf: memoryview | None = None
    while length > 0:
        if stop is not None and stop.is_set():
            raise _Stop
        if run <= 0:
            hole, run = _hole_at(src_fd, offset, length)
            if hole:  # the output was sized up front: leave the hole a hole (sparse in, sparse out)
                offset, dst_offset, length = offset + hole, dst_offset + hole, length - hole
                run = 0
                if progress:
                    progress(hole)
                continue
        if use_cfr:
            chunk = min(run, _COPY_CHUNK_CFR)
            if offset % BLOCK and (offset - dst_offset) % BLOCK == 0:
                # congruent but not aligned: the head up to the block boundary on its own, so that the rest
                # starts aligned, which a copy-on-write file system needs to clone it (an unaligned call copies)
                chunk = min(chunk, BLOCK - offset % BLOCK)
            try:
                n = os.copy_file_range(src_fd, dst_fd, chunk, offset, dst_offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                    raise  # ENOSPC, EIO: real failures, not "this file system cannot"
                use_cfr = False
                continue
            if n == 0:
                raise CheckpointFormatError("source file ended early while copying (was it truncated?)")
        else:
            if buf is None:  # one buffer for the whole range: a new 16 MiB object per chunk costs 2-3x the copy
                buf = memoryview(bytearray(_COPY_CHUNK))
            n = os.preadv(src_fd, [buf[: min(run, _COPY_CHUNK)]], offset)
            if not n:
                raise CheckpointFormatError("source file ended early while copying (was it truncated?)")
            write_all(dst_fd, buf[:n], dst_offset)
        offset += n
        dst_offset += n
        length -= n
        run -= n
        if progress:
            progress(n)


copy_range = _copy_range


def _hole_at(fd: int, offset: int, length: int) -> tuple[int, int]:
    """``(hole, data)``: bytes of hole from ``offset`` in a sparse file, else bytes of data up to the next hole
    (each at most ``length``). A file without holes, or no SEEK_DATA, gives ``(0, length)``."""
    if not hasattr(os, "SEEK_DATA"):
        return 0, length
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
        if data > offset:
            return min(data - offset, length), 0
        return 0, min(os.lseek(fd, offset, os.SEEK_HOLE) - offset, length)
    except OSError as e:
        return (length, 0) if e.errno == errno.ENXIO else (0, length)  # ENXIO: only holes from here on


Copies = list[tuple[int, int, int, int]]  # (src_fd, offset, length, dst_offset)


class Copier(ABC):
    """The byte-range copies of one output, running beside the thread that produces the other tensors."""

    @abstractmethod
    def failed(self) -> bool:
        """Whether the copy has failed already (the producer may stop early)."""

    @abstractmethod
    def join(self) -> None:
        """Wait for the copies; raise what made them fail."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop copying and wait until nothing writes to the output any more."""


class Output:
    """The files of one output being written: its sources (each opened once), the output itself and its copier.
    On leaving the ``with`` block a copier still running is cancelled and every file is closed."""

    def __init__(self) -> None:
        self.sources: dict[Path, int] = {}
        self.fd = -1
        self.copier: Copier | None = None

    def source(self, path: Path) -> int:
        """The descriptor of a source file, opened on first use."""
        fd = self.sources.get(path)
        if fd is None:
            fd = self.sources[path] = os.open(path, os.O_RDONLY)
        return fd

    def create(self, dst: Path, size: int) -> int:
        """Open ``dst`` (a fresh temp file) sized to ``size`` bytes: ranges land in any order, holes of a source
        stay holes. No ``O_TRUNC``: truncating an existing file makes ext4 (``auto_da_alloc``) push all of its
        delayed blocks to disk on close, which cost ~1 s per 4 GB here."""
        self.fd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o666)
        os.ftruncate(self.fd, size)
        return self.fd

    def start(self, copies: Copies, progress: Progress | None) -> Copier:
        """Start copying ``copies`` into the output (:func:`start_copier`)."""
        self.copier = start_copier(copies, self.fd, progress)
        return self.copier

    def join(self) -> None:
        """Wait for the copies; raise what made them fail."""
        if self.copier is not None:
            self.copier.join()
            self.copier = None

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.copier is not None:
            self.copier.cancel()
        if self.fd >= 0:
            os.close(self.fd)
        for fd in self.sources.values():
            os.close(fd)


def start_copier(copies: Copies, dst_fd: int, progress: Progress | None) -> Copier:
    """A forked child process where the OS has ``fork`` and ``copy_file_range`` (Linux), else a thread.

    A thread shares the GIL with a main thread that is importing torch, and an import holds the GIL for long
    stretches (dlopen, module initialisation): measured here, 4 GB copied in a thread while torch was
    imported took 1.8-3.5 s, in a forked child 1.7-1.9 s, the copy alone 1.5-2.4 s (4 rounds each).
    """
    if not copies:
        return _ThreadCopier([], dst_fd, progress)
    if _FORK_COPIES:
        try:
            return _ForkCopier(copies, dst_fd, progress)
        except OSError:  # EAGAIN/ENOMEM from fork (process limits): copy in a thread instead
            pass
    return _ThreadCopier(copies, dst_fd, progress)


class _ThreadCopier(Copier):
    def __init__(self, copies: Copies, dst_fd: int, progress: Progress | None) -> None:
        self._stop = threading.Event()
        self._failure: list[BaseException] = []

        def copy_all() -> None:
            try:
                for src_fd, off, length, dst_off in copies:
                    _copy_range(src_fd, dst_fd, off, length, dst_off, self._stop, progress)
            except _Stop:
                pass
            except BaseException as e:  # handed to the main thread
                self._failure.append(e)

        self._worker = threading.Thread(target=copy_all, name="vitresize-copy", daemon=True)
        self._worker.start()

    def failed(self) -> bool:
        return bool(self._failure)

    def join(self) -> None:
        self._worker.join()
        if self._failure:
            raise self._failure[0]

    def cancel(self) -> None:
        self._stop.set()
        self._worker.join()


_DONE = struct.Struct("<q")  # the child's messages: bytes copied (>= 0), or -length of a JSON error that follows


class _ForkCopier(Copier):
    """The copies done by a forked child, which reports progress and failure through a pipe."""

    def __init__(self, copies: Copies, dst_fd: int, progress: Progress | None) -> None:
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise
        if pid == 0:  # the child: system calls only, then _exit (no atexit, no buffers flushed twice)
            code = 0
            try:
                os.close(read_end)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches both; the parent cancels it
                for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)):
                    signal.signal(sig, signal.SIG_DFL)
                for src_fd, off, length, dst_off in copies:
                    _copy_range(src_fd, dst_fd, off, length, dst_off, None, lambda n: _send(write_end, n))
            except BaseException as e:
                code = 1
                with contextlib.suppress(BaseException):
                    _send_error(write_end, e)
            finally:
                os._exit(code)
        os.close(write_end)
        self._pid: int | None = pid
        self._status = 0
        self._pipe = read_end
        self._error: BaseException | None = None
        self._reader = threading.Thread(target=self._read, args=(progress,), name="vitresize-copy", daemon=True)
        self._reader.start()

    def _read(self, progress: Progress | None) -> None:
        with open(self._pipe, "rb", buffering=0) as pipe:
            while len(head := _read_exactly(pipe, _DONE.size)) == _DONE.size:
                (n,) = _DONE.unpack(head)
                if n < 0:
                    self._error = _error_from(_read_exactly(pipe, -n))
                    return
                if progress:
                    progress(n)

    def failed(self) -> bool:
        return self._error is not None

    def join(self) -> None:
        self._wait()
        self._reader.join()
        if self._error is not None:
            raise self._error
        if self._status != 0:
            raise CheckpointFormatError(f"the copy process ended with status {self._status} (killed?)")

    def cancel(self) -> None:
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            self._wait()
        self._reader.join()

    def _wait(self) -> None:
        if self._pid is not None:
            _, status = os.waitpid(self._pid, 0)
            self._pid = None
            self._status = os.waitstatus_to_exitcode(status)


def _send(fd: int, n: int) -> None:
    os.write(fd, _DONE.pack(n))


def _send_error(fd: int, e: BaseException) -> None:
    if isinstance(e, OSError):
        name = os.fsdecode(e.filename) if isinstance(e.filename, (str, bytes)) else None
        info: dict[str, Any] = {"type": "OSError", "errno": e.errno, "strerror": e.strerror or str(e), "filename": name}
    elif isinstance(e, CheckpointFormatError):
        info = {"type": "CheckpointFormatError", "message": e.message.raw}
    else:
        info = {"type": type(e).__name__, "message": str(e)}
    raw = json.dumps(info).encode()
    os.write(fd, _DONE.pack(-len(raw)) + raw)


def _error_from(raw: bytes) -> BaseException:
    try:
        info = json.loads(raw)
    except ValueError:
        return CheckpointFormatError("the copy process failed (unreadable report)")
    if info.get("type") == "OSError":
        return OSError(info.get("errno"), info.get("strerror"), info.get("filename"))
    if info.get("type") == "CheckpointFormatError":
        return CheckpointFormatError(info.get("message", ""))
    return CheckpointFormatError(f"the copy process failed: {info.get('type')}: {info.get('message')}")


def _read_exactly(pipe: Any, n: int) -> bytes:
    """``n`` bytes from the pipe, or what came before it closed (b"" at a clean end)."""
    buf = b""
    while len(buf) < n:
        chunk = pipe.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf
