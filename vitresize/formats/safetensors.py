"""safetensors: header-first reading, and a streaming writer that copies untouched byte ranges.

The header is parsed and validated here (no torch needed), so ``inspect`` and planning only read the
header. Tensors to resample are read by offset (the header has validated them); every other tensor is copied from
the source file as raw bytes by the copy engine (:mod:`._copy`), never decoded.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import reprlib
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import CheckpointFormatError, InternalError
from ..keymaps import TensorInfo
from . import _copy
from ._dtypes import ST_BITS, ST_DTYPES, TORCH_TO_ST, count_nonfinite
from ._files import open_regular
from ._json import Pairs, layers, loads, of_type, strings, too_deep
from .base import ROOT, Checkpoint, Segment, WriteJob, Writer, Written, replaced_segments

if TYPE_CHECKING:
    import torch

    from ..resample.torchfree import Table
    from ._copy import Progress

__all__ = ["SafetensorsCheckpoint", "SafetensorsWriter", "read_header", "tensor_bytes", "write_safetensors"]

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

    writer: ClassVar[str] = "safetensors"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.format = "safetensors"
        self.lazy = True
        self.data_start, self.entries, self.metadata = read_header(path)
        self.state_dicts = {ROOT: {k: TensorInfo(e.shape, ST_DTYPES[e.dtype][0]) for k, e in self.entries.items()}}
        self.extras = []
        self._mmap: mmap.mmap | None = None

    def segments(self, state_dict: str) -> list[Segment]:
        """Every tensor as its byte range, in file order; loaded as a tensor mapped from the file."""
        infos = self.state_dicts[state_dict]
        return [
            Segment(key, infos[key].dtype, infos[key].shape, e.end - e.start, self._mapper(key), (self.path, e.start))
            for key, e in sorted(self.entries.items(), key=lambda kv: kv[1].start)
        ]

    def _mapper(self, key: str) -> Any:
        return lambda: self.mapped_tensor(key)

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
        """A tensor backed by a shared read-only mapping of the file: no bytes are read until used."""
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

    def _release(self) -> None:
        # A mapping still referenced by tensors cannot be closed; the GC releases it with them.
        self._mmap = None


class SafetensorsWriter(Writer):
    """``.safetensors``: one flat state dict; untouched byte ranges copied file to file, the input's metadata
    kept and the conversion's provenance added."""

    format: ClassVar[str] = "safetensors"
    suffixes: ClassVar[tuple[str, ...]] = (".safetensors",)
    keeps_metadata: ClassVar[bool] = True
    stores_every_element: ClassVar[bool] = True

    def writes_raw(self, ckpt: Checkpoint) -> bool:
        return True

    def write(self, out: Path, job: WriteJob, progress: Progress | None) -> Written:
        ckpt = job.checkpoint
        segments = replaced_segments(ckpt, job.state_dicts[0], job.replacements)
        metadata = {"format": "pt", **ckpt.metadata, **job.metadata}
        return Written(write_safetensors(out, segments, metadata, progress))


def tensor_bytes(t: torch.Tensor | Table) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (or a numpy-held :class:`Table`), without a copy when it is
    contiguous."""
    from ..resample.torchfree import Table

    if isinstance(t, Table):
        return t.to_bytes()
    import torch

    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def congruent_start(segments: list[Segment]) -> int | None:
    """Where the data should start, modulo :data:`._copy.BLOCK`, for the largest copied run to be block-congruent
    with its source (``None``: no copied run, or one that would misalign the data from 8 bytes).

    A file system that shares blocks between files (XFS with reflink, btrfs, ZFS block cloning, NFS 4.2 server
    side copy) clones a ``copy_file_range`` instead of copying it only where source and destination offsets are
    congruent modulo the block size. safetensors allows no gap between tensors, but its header may end in spaces:
    padding it moves every tensor, so the largest run of segments copied contiguously from one file (a ViT's
    blocks, after its position table) lands congruent with where it was; the tensors keep their order. Runs after
    a tensor whose size changed may still land off the block grid, and are copied.
    """
    best: tuple[int, int, int] | None = None  # (run bytes, run's source offset, bytes before it in the output)
    at = 0
    run_bytes = run_src = run_at = 0
    prev: Segment | None = None
    for s in segments:
        contiguous = (
            s.source is not None
            and prev is not None
            and prev.source is not None
            and prev.source[0] == s.source[0]
            and prev.source[1] + prev.nbytes == s.source[1]
        )
        if s.source is not None and not contiguous:
            run_bytes, run_src, run_at = 0, s.source[1], at
        if s.source is not None:
            run_bytes += s.nbytes
            if best is None or run_bytes > best[0]:
                best = (run_bytes, run_src, run_at)
        at += s.nbytes
        prev = s
    if best is None or (best[1] - best[2]) % 8:
        return None
    return (best[1] - best[2]) % _copy.BLOCK


def _header_bytes(segments: list[Segment], metadata: dict[str, str], start: int | None = None) -> bytes:
    """The length-prefixed header; with ``start``, padded with spaces so that the data begins at an offset
    congruent to ``start`` modulo :data:`._copy.BLOCK` (else to a multiple of 8)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for s in segments:
        if s.key == "__metadata__":
            raise CheckpointFormatError(
                "a tensor is named '__metadata__', which safetensors reserves for the file's metadata; "
                "write a .pth instead (or rename the tensor)"
            )
        if s.dtype not in TORCH_TO_ST:
            raise CheckpointFormatError(
                f"tensor {s.key!r} has dtype {s.dtype}, which safetensors cannot store; write a .pth instead"
            )
        header[s.key] = {
            "dtype": TORCH_TO_ST[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8 if start is None else (start - 8 - len(raw)) % _copy.BLOCK)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    dst: Path, segments: Iterable[Segment], metadata: dict[str, str], progress: Progress | None = None
) -> int:
    """Write a safetensors file from segments, in order, the header padded (:func:`congruent_start`) so that
    the largest copied run is block-congruent with its source and a copy-on-write file system clones it.

    The layout follows from the segments' shapes alone, so every byte has a known place before any tensor
    is computed: the copy engine (:func:`._copy.start_copier`, a child process or a thread) copies the
    segments' source byte ranges (adjacent ones coalesced) to their places while this thread produces the
    other tensors (importing torch, resampling) and writes them.

    Returns:
        The number of bytes written.
    """
    segs = list(segments)
    head = _header_bytes(segs, metadata, congruent_start(segs))
    with _copy.Output() as out:
        copies: _copy.Copies = []  # (src_fd, offset, length, dst_offset)
        produced: list[tuple[Segment, int]] = []
        at = len(head)
        for s in segs:
            if s.source is not None:
                path, off = s.source
                src = out.source(path)
                last = copies[-1] if copies else None
                if last is not None and last[0] == src and last[1] + last[2] == off and last[3] + last[2] == at:
                    copies[-1] = (src, last[1], last[2] + s.nbytes, last[3])
                else:
                    copies.append((src, off, s.nbytes, at))
            else:
                produced.append((s, at))
            at += s.nbytes
        fd = out.create(dst, at)
        _copy.write_all(fd, memoryview(head), 0, progress)
        copier = out.start(copies, progress)
        for s, offset in produced:
            data = tensor_bytes(s.load())
            if len(data) != s.nbytes:
                raise InternalError(f"tensor {s.key!r} has {len(data)} bytes, planned {s.nbytes}")
            _copy.write_all(fd, data, offset, progress)
            if copier.failed():
                break
        out.join()
        return at
