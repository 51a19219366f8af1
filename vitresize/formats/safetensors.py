"""safetensors: header-first reading, and a streaming writer that copies untouched byte ranges.

The header is parsed and validated here (no torch needed), so ``inspect`` and planning only read the
header. Tensors to resample are read by offset (the header has validated them); every other tensor is copied from
the source file as raw bytes (``os.copy_file_range`` with a buffered fallback), never decoded.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import mmap
import os
import signal
import struct
import sys
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointFormatError
from ..keymaps import TensorInfo
from ._dtypes import ST_DTYPES, TORCH_TO_ST, count_nonfinite
from .base import ROOT, Checkpoint

if TYPE_CHECKING:
    import torch

    from ..resample.torchfree import Table

__all__ = ["SafetensorsCheckpoint", "Segment", "read_header", "write_safetensors"]

MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
_COPY_CHUNK = 16 * 1024 * 1024  # buffered fallback
# copy_file_range: ask for as much as the kernel takes in one call (MAX_RW_COUNT), as cp does. Measured on
# this project's VM (ext4, 4 GB, medians of 5, page cache synced before each run): calls of 8 MiB to 1 GiB
# took 3.8-4.6 s where calls of 2 GiB took 1.6-1.9 s, as fast as cp; fewer calls also mean fewer GIL
# hand-overs with a main thread that is importing torch.
_COPY_CHUNK_CFR = 0x7FFFF000
_WRITE_CHUNK = 256 * 1024 * 1024  # pwrite of produced tensors
_FORK_COPIES = sys.platform == "linux" and hasattr(os, "fork") and hasattr(os, "copy_file_range")


@dataclass(frozen=True)
class _Entry:
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int


def read_header(path: Path) -> tuple[int, dict[str, _Entry], dict[str, str]]:
    """Read and validate a safetensors header.

    Returns:
        ``(data_start, entries, metadata)``, offsets in ``entries`` absolute in the file.

    Raises:
        CheckpointFormatError: the header is cut short, not JSON, or describes tensors that do not fit.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(f"{path} is not a valid safetensors file: shorter than its 8-byte header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointFormatError(
                f"{path} is not a valid safetensors file: header of {n} bytes does not fit in a {size}-byte file "
                f"(truncated download?)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointFormatError(f"{path} is not a valid safetensors file: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path} is not a valid safetensors file: header is not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointFormatError(f"{path}: __metadata__ must map strings to strings")
    entries: dict[str, _Entry] = {}
    for name, spec in header.items():
        entries[name] = _validate_entry(path, name, spec, data_len, data_start)
    spans = sorted((e.start, e.end, k) for k, e in entries.items() if e.end > e.start)
    for (_, end_a, a), (start_b, _, b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise CheckpointFormatError(f"{path} is corrupt: tensors {a!r} and {b!r} overlap")
        if start_b > end_a:
            raise CheckpointFormatError(f"{path} is corrupt: {start_b - end_a} bytes between tensors {a!r} and {b!r}")
    covered = (spans[-1][1] if spans else data_start) - data_start
    if (spans and spans[0][0] != data_start) or covered != data_len:
        raise CheckpointFormatError(
            f"{path} is corrupt: its tensors cover {covered} of the {data_len} bytes after the header "
            f"(bytes appended, or offsets edited?)"
        )
    return data_start, entries, dict(meta)


def _validate_entry(path: Path, name: str, spec: Any, data_len: int, data_start: int) -> _Entry:
    try:
        dtype, shape, (start, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
        shape = tuple(int(s) for s in shape)
        start, end = int(start), int(end)
    except (KeyError, TypeError, ValueError):
        raise CheckpointFormatError(f"{path} is corrupt: bad header entry for {name!r}") from None
    if dtype not in ST_DTYPES:
        raise CheckpointFormatError(f"{path}: tensor {name!r} has dtype {dtype!r}, which vitresize does not support")
    numel = 1
    for s in shape:
        if s < 0:
            raise CheckpointFormatError(f"{path} is corrupt: tensor {name!r} has a negative dimension")
        numel *= s
    if not 0 <= start <= end <= data_len:
        raise CheckpointFormatError(
            f"{path} is corrupt or truncated: tensor {name!r} lies at bytes {start}-{end} "
            f"of a {data_len}-byte data section"
        )
    if end - start != numel * ST_DTYPES[dtype][1]:
        raise CheckpointFormatError(
            f"{path} is corrupt: tensor {name!r} ({dtype} {list(shape)}) needs {numel * ST_DTYPES[dtype][1]} bytes, "
            f"header gives {end - start}"
        )
    return _Entry(dtype, shape, data_start + start, data_start + end)


class SafetensorsCheckpoint(Checkpoint):
    """A ``.safetensors`` file: one flat state dict, read header-first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.format = "safetensors"
        self.lazy = True
        self.data_start, self.entries, self.metadata = read_header(path)
        self.state_dicts = {ROOT: {k: TensorInfo(e.shape, ST_DTYPES[e.dtype][0]) for k, e in self.entries.items()}}
        self.extras = []
        self._mmap: mmap.mmap | None = None

    def tensor(self, state_dict: str, key: str) -> torch.Tensor:
        """Read one tensor's bytes (``pread``; the file is not mapped: a private mapping of a file bigger than
        memory is refused by the kernel's overcommit check, as ``safe_open`` is on an 87 GB file)."""
        import torch

        e = self.entries[key]
        dtype = getattr(torch, ST_DTYPES[e.dtype][0])
        buf = self._read(key)
        if not buf:
            return torch.empty(e.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(e.shape)

    def raw_bytes(self, state_dict: str, key: str) -> bytes | None:
        return bytes(self._read(key))

    def _read(self, key: str) -> bytearray:
        e = self.entries[key]
        n = e.end - e.start
        buf = bytearray(n)
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(e.start)
                got = f.readinto(buf)
        except OSError as err:
            raise CheckpointFormatError(f"{self.path}: cannot read tensor {key!r}: {err.strerror}") from None
        if got != n:
            raise CheckpointFormatError(f"{self.path}: tensor {key!r} is cut short (truncated file?)")
        return buf

    def count_nonfinite(self, state_dict: str, key: str) -> int:
        """Counted from the raw bytes, without torch (``inspect`` of a safetensors file never imports it)."""
        return count_nonfinite(self._read(key), self.entries[key].dtype)

    def mapped_tensor(self, key: str) -> torch.Tensor:
        """A tensor backed by a private (copy-on-write) mapping of the file: no bytes are read until used."""
        import torch

        e = self.entries[key]
        dtype = getattr(torch, ST_DTYPES[e.dtype][0])
        if e.end == e.start:
            return torch.empty(e.shape, dtype=dtype)
        if self._mmap is None:
            # Shared and read-only: no commit charge, so files bigger than memory map too (torch.save only
            # reads these tensors).
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "buffer is not writable": nothing writes to it
            flat = torch.frombuffer(self._mmap, dtype=torch.uint8, count=e.end - e.start, offset=e.start)
        return flat.view(dtype).reshape(e.shape)

    def close(self) -> None:
        # A mapping still referenced by tensors cannot be closed; the GC releases it with them.
        self._mmap = None


@dataclass(frozen=True)
class Segment:
    """One tensor of the output: its bytes come from ``copy_from`` (a source byte range) or ``tensor``."""

    name: str
    dtype: str  # torch name
    shape: tuple[int, ...]
    nbytes: int
    copy_from: tuple[int, int] | None = None  # (source fd, offset)
    tensor: Callable[[], torch.Tensor | Table] | None = None


Progress = Callable[[int], None]
"""Called with the number of bytes just written (from the writer's threads: keep it cheap and thread-safe)."""


def _write_all(fd: int, data: memoryview, offset: int, progress: Progress | None = None) -> None:
    """``pwrite`` all of ``data`` at ``offset``."""
    while data:
        n = os.pwrite(fd, data[:_WRITE_CHUNK], offset)
        data = data[n:]
        offset += n
        if progress:
            progress(n)


class _Stop(Exception):
    pass


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
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(run, _COPY_CHUNK_CFR), offset, dst_offset)
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
            _write_all(dst_fd, buf[:n], dst_offset)
        offset += n
        dst_offset += n
        length -= n
        run -= n
        if progress:
            progress(n)


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


def tensor_bytes(t: torch.Tensor | Table) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (or a numpy-held :class:`Table`), without a copy when it is
    contiguous."""
    from ..resample.torchfree import Table

    if isinstance(t, Table):
        return t.to_bytes()
    import torch

    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _header_bytes(segments: list[Segment], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for s in segments:
        if s.dtype not in TORCH_TO_ST:
            raise CheckpointFormatError(
                f"tensor {s.name!r} has dtype {s.dtype}, which safetensors cannot store; write a .pth instead"
            )
        header[s.name] = {
            "dtype": TORCH_TO_ST[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    dst: Path, segments: Iterable[Segment], metadata: dict[str, str], progress: Progress | None = None
) -> int:
    """Write a safetensors file from segments, in order.

    The layout follows from the segments' shapes alone, so every byte has a known place before any tensor
    is computed: a child process (else a thread, see :func:`_start_copier`) copies the source byte ranges
    (adjacent ones coalesced) to their places while this thread produces the other tensors (importing torch,
    resampling) and writes them.

    Returns:
        The number of bytes written.
    """
    segs = list(segments)
    head = _header_bytes(segs, metadata)
    copies: list[tuple[int, int, int, int]] = []  # (src_fd, offset, length, dst_offset)
    produced: list[tuple[Segment, int]] = []
    at = len(head)
    for s in segs:
        if s.copy_from is not None:
            fd, off = s.copy_from
            last = copies[-1] if copies else None
            if last is not None and last[0] == fd and last[1] + last[2] == off and last[3] + last[2] == at:
                copies[-1] = (fd, last[1], last[2] + s.nbytes, last[3])
            else:
                copies.append((fd, off, s.nbytes, at))
        else:
            produced.append((s, at))
        at += s.nbytes
    # No O_TRUNC: DST is a fresh temp file, and truncating an existing file makes ext4 (auto_da_alloc)
    # push all of its delayed blocks to disk on close, which cost ~1 s per 4 GB here. ftruncate sizes it.
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o666)
    copier: _Copier | None = None
    try:
        os.ftruncate(fd, at)  # sized up front: ranges land in any order, and source holes stay holes
        _write_all(fd, memoryview(head), 0, progress)
        copier = _start_copier(copies, fd, progress)
        for s, offset in produced:
            assert s.tensor is not None
            data = tensor_bytes(s.tensor())
            if len(data) != s.nbytes:
                raise CheckpointFormatError(
                    f"internal error: tensor {s.name!r} has {len(data)} bytes, planned {s.nbytes} (a vitresize bug)"
                )
            _write_all(fd, data, offset, progress)
            if copier.failed():
                break
        copier.join()
        copier = None
        return at
    finally:
        if copier is not None:
            copier.cancel()
        os.close(fd)


Copies = list[tuple[int, int, int, int]]  # (src_fd, offset, length, dst_offset)


class _Copier(ABC):
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


def _start_copier(copies: Copies, dst_fd: int, progress: Progress | None) -> _Copier:
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


class _ThreadCopier(_Copier):
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


class _ForkCopier(_Copier):
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
        info: dict[str, Any] = {"type": "OSError", "errno": e.errno, "strerror": e.strerror or str(e)}
    elif isinstance(e, CheckpointFormatError):
        info = {"type": "CheckpointFormatError", "message": str(e)}
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
        return OSError(info.get("errno"), info.get("strerror"))
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
