"""safetensors: header-first reading, and a streaming writer that copies untouched byte ranges.

The header is parsed and validated here (no torch needed), so ``inspect`` and planning only read the
header. Tensors to resample are read by offset (the header has validated them); every other tensor is copied from
the source file as raw bytes (``os.copy_file_range`` with a buffered fallback), never decoded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import re
import reprlib
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
from . import open_regular
from ._dtypes import ST_BITS, ST_DTYPES, TORCH_TO_ST, count_nonfinite
from ._json import Pairs, layers, loads, of_type, strings, too_deep
from .base import ROOT, Checkpoint

if TYPE_CHECKING:
    import torch

    from ..resample.torchfree import Table

__all__ = ["SafetensorsCheckpoint", "Segment", "read_header", "write_safetensors"]

MAX_HEADER = 100_000_000  # the limit safetensors itself enforces (HeaderTooLarge)
# vitresize's own budgets for a header, below what safetensors reads (a deliberate difference): counted on the raw
# bytes before parsing, brackets and separators inside strings included (an upper bound). Parsed, an array or an
# object member costs 20-30 times its bytes: unbudgeted, a 100 MB header of `[],` took 33 s and 2.8 GiB here, one of
# `"":0,` 11 s and 1.8 GiB. Within both budgets the worst 100 MB headers tried (a million arrays or objects, eight
# million strings, numbers or members, four million distinct keys, -0 and surrogate escapes forcing the slow checks)
# took 1.2-9.8 s and 0.27-0.93 GiB (peak RSS of the whole process) on a 2-core VM.
MAX_HEADER_CONTAINERS = 1_000_000
"""The most ``[`` and ``{`` (JSON arrays and objects) a header may hold: a real one has 3 per tensor (the entry, its
shape, its offsets), 300,000 for 100,000 tensors."""
MAX_HEADER_SEPARATORS = 8_000_000
"""The most ``,`` and ``:`` (which bound the numbers, strings and object members) a header may hold: a real one has
about 12 per tensor, 1,200,000 for 100,000 tensors."""
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
    """Read and validate a safetensors header: a file passes exactly when ``safetensors.safe_open`` reads it, but for
    two deliberate refusals: packed sub-byte floats, and headers over :data:`MAX_HEADER_CONTAINERS` or
    :data:`MAX_HEADER_SEPARATORS`.

    The checks are those of the safetensors library (0.8) and of serde_json, which parses its headers: each
    tensor's dtype, shape and offsets typed exactly (dimensions and offsets are JSON integers from 0 to 2**64 - 1),
    the tensors laid end to end from the start of the data section to the end of the file, and each one's size
    agreeing with its shape and dtype. The file is opened as :func:`~vitresize.formats.open_regular` does.

    Returns:
        ``(data_start, entries, metadata)``, offsets in ``entries`` absolute in the file.

    Raises:
        CheckpointFormatError: the file is missing, not a regular file, or not one safetensors reads; it holds
            packed sub-byte floats (F4, F6_E2M3, F6_E3M2), which vitresize does not read; or its header is over
            vitresize's budgets.
    """
    with open_regular(path) as f:  # a file swapped for a FIFO since it was sniffed is refused, not waited on
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(f"{path} is not a valid safetensors file: shorter than its 8-byte header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise CheckpointFormatError(
                f"{path} is not a valid safetensors file: it gives a header of {n} bytes, over safetensors' limit "
                f"of {MAX_HEADER} (not a safetensors file, or its first 8 bytes are corrupt)"
            )
        if 8 + n > size:
            raise CheckpointFormatError(
                f"{path} is not a valid safetensors file: header of {n} bytes does not fit in a {size}-byte file "
                f"(truncated download?)"
            )
        raw = f.read(n)
    if len(raw) < n:
        raise CheckpointFormatError(f"{path} is not a valid safetensors file: it ended inside its header (truncated?)")
    header = _parse_json(path, raw)
    if not isinstance(header, _Object):
        raise CheckpointFormatError(f"{path} is not a valid safetensors file: header is not a JSON object")
    meta: dict[str, str] = {}
    specs: dict[str, _Entry] = {}  # offsets relative to the data section
    seen_meta = False
    for name, value in header:
        if name != "__metadata__":
            specs[name] = _validate_entry(path, name, value)  # a name given twice: the last counts, as in safetensors
        elif seen_meta:
            raise CheckpointFormatError(f"{path} is corrupt: its header gives __metadata__ twice")
        else:
            seen_meta = True
            meta = _metadata(path, value)
    data_start = 8 + n
    _check_layout(path, specs, size - data_start)
    entries: dict[str, _Entry] = {}
    for name, e in specs.items():
        if e.dtype not in ST_DTYPES:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has dtype {e.dtype} (packed sub-byte floats), which vitresize does not "
                f"support; cast it to F8/F16 before converting"
            )
        entries[name] = _Entry(e.dtype, e.shape, data_start + e.start, data_start + e.end)
    return data_start, entries, meta


def _validate_entry(path: Path, name: str, spec: Any) -> _Entry:
    """One tensor's ``{"dtype", "shape", "data_offsets"}`` (offsets relative to the data section), typed as
    safetensors' serde structs take it: other keys are ignored and a repeated one refused; serde also reads the
    struct from an array of the three values in order, and the dtype from ``{"F32": null}``."""
    bad = f"{path} is corrupt: header entry for tensor {name!r}"
    if isinstance(spec, _Object):
        fields: dict[str, Any] = {}
        for key, value in spec:
            if key not in _FIELDS:
                problem = _ignored_value_problem(value)
                if problem:
                    raise CheckpointFormatError(f"{bad}: {key!r} {problem}, which safetensors' JSON parser refuses")
            elif key in fields:
                raise CheckpointFormatError(f"{bad} gives {key!r} twice")
            else:
                fields[key] = value
        missing = [k for k in _FIELDS if k not in fields]
        if missing:
            raise CheckpointFormatError(f"{bad} has no {missing[0]!r}")
        dtype, shape, offsets = (fields[k] for k in _FIELDS)
    elif type(spec) is list and len(spec) == len(_FIELDS):
        dtype, shape, offsets = spec
    else:
        raise CheckpointFormatError(f"{bad} is {_show(spec)}, not an object of dtype, shape and data_offsets")
    if isinstance(dtype, _Object) and len(dtype) == 1 and dtype[0][1] is None:
        dtype = dtype[0][0]
    if not isinstance(dtype, str) or dtype not in ST_BITS:
        raise CheckpointFormatError(f"{bad} has dtype {_show(dtype)}, which is not a safetensors dtype")
    if type(shape) is not list or not all(type(d) is int and 0 <= d <= _U64 for d in shape):
        raise CheckpointFormatError(f"{bad} has shape {_show(shape)}; dimensions are JSON integers from 0 to 2**64-1")
    if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int and 0 <= o <= _U64 for o in offsets):
        raise CheckpointFormatError(
            f"{bad} has data_offsets {_show(offsets)}; they are [start, end], JSON integers from 0 to 2**64-1"
        )
    return _Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _metadata(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, _Object) and all(isinstance(v, str) for _, v in value):
        return dict(value)  # a key given twice: the last counts, as in safetensors
    raise CheckpointFormatError(f"{path}: __metadata__ must be null or an object of strings, not {_show(value)}")


def _check_layout(path: Path, specs: dict[str, _Entry], data_len: int) -> None:
    """The checks of safetensors' ``Metadata::validate``: in offset order, each tensor starts where the one before
    ends (the first at 0), its size follows from its shape and dtype (no 64-bit overflow, whole bytes), and the last
    one ends at the end of the file."""
    at, before = 0, ""
    for name, e in sorted(specs.items(), key=lambda item: (item[1].start, item[1].end)):
        if e.end < e.start:
            raise CheckpointFormatError(f"{path} is corrupt: tensor {name!r} ends at byte {e.end}, before its start")
        if e.start < at:
            raise CheckpointFormatError(f"{path} is corrupt: tensors {before!r} and {name!r} overlap")
        if e.start > at:
            raise CheckpointFormatError(
                f"{path} is corrupt: {e.start - at} bytes before tensor {name!r} belong to no tensor (offsets edited?)"
            )
        if e.end > data_len:
            raise CheckpointFormatError(
                f"{path} is corrupt or truncated: tensor {name!r} lies at bytes {e.start}-{e.end} "
                f"of a {data_len}-byte data section"
            )
        numel = 1
        for d in e.shape:
            numel *= d
            if numel > _U64:
                break
        bits = numel * ST_BITS[e.dtype]
        what = f"tensor {name!r} ({e.dtype} {list(e.shape)})"
        if bits > _U64:
            raise CheckpointFormatError(f"{path} is corrupt: {what} has more bytes than a 64-bit size can count")
        if bits % 8:
            raise CheckpointFormatError(f"{path} is corrupt: {what} does not fill a whole number of bytes")
        if e.end - e.start != bits // 8:
            raise CheckpointFormatError(
                f"{path} is corrupt: {what} needs {bits // 8} bytes, header gives {e.end - e.start}"
            )
        at, before = e.end, name
    if at != data_len:
        raise CheckpointFormatError(
            f"{path} is corrupt: its tensors cover {at} of the {data_len} bytes after the header "
            f"(bytes appended, or offsets edited?)"
        )


# --- the header's JSON, read as serde_json reads it ------------------------------------------------------


_Object = Pairs
"""A JSON object as its ``(key, value)`` pairs, repeated keys kept: serde refuses some, takes the last of others."""


_U64 = 2**64 - 1
_MAX_DEPTH = 127  # serde_json's recursion limit: 128 nested arrays/objects are refused
_FIELDS = ("dtype", "shape", "data_offsets")
_NEGATIVE_ZERO = re.compile(r"-0(?![.\deE])")  # an integer serde_json types as f64 (or a string holds it)
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NUMBER = re.compile(r"-?(\d+)(?:\.(\d+))?(?:[eE]([-+]?)(\d+))?")
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 40


def _show(value: Any) -> str:
    """A header value in an error message: short, on one line."""
    return _SHOW.repr(value)


def _parse_json(path: Path, raw: bytes) -> Any:
    """The header's JSON as serde_json (safetensors' parser) takes it: strict UTF-8, numbers typed as serde types
    them (no NaN/Infinity, no infinite f64), no unpaired surrogate escapes. Objects come back as :class:`_Object`,
    so repeated keys are seen; nesting deeper than ``json`` can recurse is refused here, the depth of the values
    serde would take (127 levels) is checked by :func:`_validate_entry`. Before any of it, the budgets
    :data:`MAX_HEADER_CONTAINERS` and :data:`MAX_HEADER_SEPARATORS`, counted on the bytes."""
    for count, limit, what, per_tensor in (
        (raw.count(b"[") + raw.count(b"{"), MAX_HEADER_CONTAINERS, "'[' and '{' (arrays and objects)", 3),
        (raw.count(b",") + raw.count(b":"), MAX_HEADER_SEPARATORS, "',' and ':' (values)", 12),
    ):
        if count > limit:
            raise CheckpointFormatError(
                f"{path}: its header holds {count} {what}, over vitresize's deliberate budget of {limit} (a real "
                f"header has about {per_tensor} per tensor), which bounds the memory and time of reading it, though "
                f"safetensors may read it; re-save it with safetensors, without extra header fields"
            )
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise CheckpointFormatError(
            f"{path} is not a valid safetensors file: header is not UTF-8 (byte {e.start} of it)"
        ) from None
    parse_int = _json_int if _NEGATIVE_ZERO.search(text) else int  # the hook costs a call per integer
    try:
        header = loads(
            text, object_pairs_hook=_Object, parse_int=parse_int, parse_float=_json_float, parse_constant=_no_constant
        )
    except RecursionError:
        raise CheckpointFormatError(
            f"{path} is not a valid safetensors file: header nests deeper than {_MAX_DEPTH} levels, "
            f"which safetensors' JSON parser refuses"
        ) from None
    except ValueError as e:
        raise CheckpointFormatError(f"{path} is not a valid safetensors file: header is not JSON ({e})") from None
    if _MAYBE_SURROGATE.search(text) and any(map(_SURROGATE.search, strings(header))):
        raise CheckpointFormatError(
            f"{path} is not a valid safetensors file: header holds an unpaired UTF-16 surrogate escape (\\udXXX)"
        )
    return header


def _ignored_value_problem(value: Any) -> str | None:
    """Why serde_json refuses a value of a tensor entry that safetensors ignores but parses all the same: arrays and
    objects nested deeper than its limit (the header and the entry are two levels), or an integer beyond the u64
    and i64 ranges whose f64 is infinite. None where it takes the value. Without recursion, and without a Python
    step per number unless one is out of range (``min``/``max`` look)."""
    if too_deep(value, _MAX_DEPTH, level=3):  # the header and the entry are levels 1 and 2
        return f"nests deeper than {_MAX_DEPTH} levels"
    for _, values in layers(value):
        if max(of_type(values, int), default=0) > _U64 or min(of_type(values, int), default=0) < -(2**63):
            for v in of_type(values, int):
                if not -(2**63) <= v <= _U64 and not _serde_f64_finite(str(v)):
                    return "holds a number out of range"
    return None


def _json_int(literal: str) -> int | float:
    """A JSON integer typed as serde_json types it: an integer where a u64 or an i64 holds it, else (``-0`` too) an
    f64, which no dimension or offset accepts."""
    if len(literal) < 19 and literal != "-0":  # the common case first: at most 18 digits fit an i64
        return int(literal)
    if len(literal) <= 20:
        value = int(literal)
        if -(2**63) <= value <= _U64 and literal != "-0":
            return value
    return _json_float(literal)


def _json_float(literal: str) -> float:
    value = float(literal)
    if abs(value) < 1e307 or _serde_f64_finite(literal):
        return value
    raise ValueError(f"number {literal if len(literal) < 24 else literal[:20] + '...'} is out of range")


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _serde_f64_finite(literal: str) -> bool:
    """Whether serde_json (without ``float_roundtrip``, as safetensors builds it) reads a JSON number as a finite
    f64: it keeps the leading digits that fit a u64, counts the dropped integer digits into the exponent, and
    multiplies by a power of ten, refusing an infinite result."""
    m = _NUMBER.fullmatch(literal)
    assert m is not None, literal  # json matched it as a number
    digits, fraction, sign, exp_digits = m.groups()
    significand, kept = _leading_digits(0, digits)
    exponent = len(digits) - kept
    if fraction is not None:
        significand, kept = _leading_digits(significand, fraction)
        exponent -= kept
    if exp_digits is not None:
        exp = int(exp_digits.lstrip("0") or "0") if len(exp_digits.lstrip("0")) <= 10 else 2**31
        if exp > 2**31 - 1:  # the exponent overflows an i32: serde gives 0, or refuses a non-zero number grown huge
            return significand == 0 or sign == "-"
        exponent += -exp if sign == "-" else exp
    if exponent < 0 or significand == 0:
        return True
    return exponent <= 308 and not math.isinf(float(significand) * float(f"1e{exponent}"))


def _leading_digits(significand: int, digits: str) -> tuple[int, int]:
    """``significand`` extended by the digits of ``digits`` up to the first that would overflow a u64, and how many
    digits were taken."""
    kept = 0
    if significand == 0:
        rest = digits.lstrip("0")
        kept, digits = len(digits) - len(rest), rest
    for c in digits[:21]:
        nxt = significand * 10 + int(c)
        if nxt > _U64:
            break
        significand, kept = nxt, kept + 1
    return significand, kept


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
        dtype = self._dtype(key)
        buf = self._read(key)
        if not buf:
            return torch.empty(e.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(e.shape)

    def _dtype(self, key: str) -> torch.dtype:
        import torch

        code = self.entries[key].dtype
        dtype = getattr(torch, ST_DTYPES[code][0], None)
        if not isinstance(dtype, torch.dtype):  # float8_e8m0fnu came with torch 2.7
            raise CheckpointFormatError(
                f"{self.path}: tensor {key!r} is {code}, which torch {torch.__version__} cannot hold; upgrade torch"
            )
        return dtype

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
        dtype = self._dtype(key)
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
