"""What a torch zip checkpoint holds, read without torch: ``data.pkl`` through a tiny allow-listed unpickler.

``torch.save`` writes a zip of stored (uncompressed) members: ``<name>/data.pkl`` (the container, with each
tensor pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` and each storage as
a persistent id ``("storage", torch.FloatStorage, key, location, numel)``) and ``<name>/data/<key>`` (the
storage bytes). This module unpickles ``data.pkl`` into plain Python objects with :class:`TensorRef` in place
of tensors, and finds each storage's byte range in the file, so that a conversion can plan its output and
start copying before ``import torch`` (1.6 s here) has finished, and ``inspect`` never imports torch.

A conversion to .safetensors then copies those byte ranges and never runs ``torch.load``, so the index
accepts only what ``torch.load(weights_only=True, mmap=True)`` accepts, with the same result, and reads the
bytes torch reads. It looks members up as torch's miniz does (by the first member's folder, names compared
ASCII-case-insensitively, as many entries as the end record counts) and unpickles with the opcodes, stack and
memo of ``torch/_weights_only_unpickler.py``, strictly: anything it does not model exactly (a global outside
its allow-list, a ``BUILD`` on a tensor, an argument of another type than ``torch.save`` writes, a big-endian
file, a compressed member, ...) makes :func:`read_zip_index` return ``None``, and the caller loads the file
with ``torch.load(weights_only=True)``, which decides and reports. Tensor data is always materialized by torch.

Before that fallback, :func:`check_zip` refuses what torch.load must not be handed or reads inconsistently
(torch 2.x, found by trying): two members with one name (miniz's binary search picks either copy), a storage
member of another size than ``data.pkl`` declares (``mmap=True`` maps the bytes after it, ``mmap=False``
refuses), a compressed storage member (``mmap=True`` reads the compressed bytes), and a member torch reads
whole (``data.pkl``, ``version``, ...) over :data:`MAX_RECORD` bytes or inflating more than
:data:`MAX_RATIO` times (a few MB of deflated zeros would take GBs). :func:`check_legacy` refuses a legacy
pickle whose storages declare more bytes than the file holds.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import io
import math
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CheckpointFormatError
from ._dtypes import ST_DTYPES, TORCH_TO_ST

__all__ = [
    "MAX_RATIO",
    "MAX_RECORD",
    "TensorRef",
    "ZipIndex",
    "check_legacy",
    "check_zip",
    "data_offset",
    "is_tensor_ref",
    "read_zip_index",
]

# torch.<Name>Storage -> torch dtype name (bytes per element from _dtypes)
_STORAGES: dict[str, str] = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_FLOATS = {"float32", "float64", "float16", "bfloat16"}  # the dtypes that may require grad
MAX_RECORD = 256 * 1024 * 1024  # cap on a member torch reads whole: data.pkl holds no tensor data
MAX_RATIO = 100  # deflate ratio above which a member is refused as a bomb (pickles compress 3-10x)
_MAX_VERSION = 10  # torch 2.x reads zip format versions 1..10; torch.save writes 3
_INT64 = 2**63
# The members torch.load reads whole, under the archive folder.
_RECORDS = (
    "data.pkl",
    "byteorder",
    "version",
    ".data/version",
    ".format_version",
    ".storage_alignment",
    ".data/serialization_id",
)
"""The members torch.load reads whole (where present)."""


class _Unsupported(Exception):
    """Something this index does not model; torch.load decides."""


@dataclass(frozen=True, eq=False)
class _StorageType:
    name: str
    itemsize: int


@dataclass(frozen=True, eq=False)
class _Storage:
    key: str
    dtype: str
    itemsize: int
    numel: int


@dataclass(frozen=True, eq=False)  # eq=False: hashed and compared by identity, as torch tensors are as dict keys
class TensorRef:
    """A tensor of the checkpoint, as ``data.pkl`` describes it (no data)."""

    storage: _Storage
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    param: bool = False  # made by _rebuild_parameter

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.storage.itemsize

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def _ints(x: Any) -> tuple[int, ...]:
    if type(x) is not tuple or not all(type(i) is int and 0 <= i < _INT64 for i in x):
        raise _Unsupported("size or stride")
    return x


def _hooks(x: Any) -> None:
    """``backward_hooks`` as torch.save writes them: an empty OrderedDict."""
    if type(x) is not OrderedDict or x or vars(x):
        raise _Unsupported("backward hooks")


def _rebuild_tensor(*args: Any) -> TensorRef:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks)``, with the
    checks ``set_`` makes (the view lies inside its storage); a ``metadata`` argument is not modelled."""
    if len(args) != 6:
        raise _Unsupported("tensor arguments")
    storage, offset, size, stride, requires_grad, hooks = args
    if type(storage) is not _Storage or type(offset) is not int or not 0 <= offset < _INT64:
        raise _Unsupported("tensor")
    shape, strides = _ints(size), _ints(stride)
    if len(shape) != len(strides) or type(requires_grad) is not bool:
        raise _Unsupported("tensor")
    if requires_grad and storage.dtype not in _FLOATS:
        raise _Unsupported("requires_grad on an integer tensor")
    _hooks(hooks)
    if math.prod(shape) >= _INT64:
        raise _Unsupported("tensor size")
    if all(shape):  # set_ checks that a non-empty view lies inside its storage
        end = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1
        if end > storage.numel:
            raise _Unsupported("view outside its storage")
    return TensorRef(storage, offset, shape, strides)


def _rebuild_parameter(*args: Any) -> TensorRef:
    """``torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)``."""
    if len(args) != 3:
        raise _Unsupported("parameter arguments")
    data, requires_grad, hooks = args
    if type(data) is not TensorRef or data.param or type(requires_grad) is not bool:
        raise _Unsupported("parameter")
    if requires_grad and data.dtype not in _FLOATS:
        raise _Unsupported("requires_grad on an integer parameter")
    _hooks(hooks)
    return TensorRef(data.storage, data.offset, data.shape, data.stride, param=True)


def _itemsize(dtype: str) -> int:
    return ST_DTYPES[TORCH_TO_ST[dtype]][1]


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, _itemsize(dtype)) for name, dtype in _STORAGES.items()},
}
# For check_zip: every storage type torch.load allows, with its bytes per element (quantized and complex
# ones, and the UntypedStorage that torch.save writes for float8 and unsigned dtypes).
_SCAN_TYPES: dict[tuple[str, str], _StorageType] = {
    **{k: v for k, v in _GLOBALS.items() if isinstance(v, _StorageType)},
    **{
        ("torch", name): _StorageType(name, n)
        for name, n in [("ComplexFloatStorage", 8), ("ComplexDoubleStorage", 16), ("QInt32Storage", 4)]
        + [(f"{q}Storage", 1) for q in ("QInt8", "QUInt8", "QUInt4x2", "QUInt2x4")]
    },
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", 1),
}
_ANY = object()  # check_zip's stand-in for every object but storages
_STORAGE_PID = ("storage", b"storage")


class _Unpickler:
    """``data.pkl`` read opcode by opcode as torch's weights-only unpickler reads it (same opcodes, marks, memo
    and target checks), building the stubs above; anything else raises :class:`_Unsupported`.

    With ``scan=True`` (for :func:`check_zip`, on files the index does not model) every global but the storage
    types is an opaque stand-in: only the persistent ids are kept, in :attr:`nbytes` (first one per key, as
    torch keeps it; ``None`` where the size cannot be told).
    """

    def __init__(self, file: BinaryIO, *, scan: bool = False) -> None:
        self.file = file
        self.scan = scan
        self.storages: dict[str, _Storage] = {}
        self.nbytes: dict[Any, int | None] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # as torch does for protocol-2 pickles
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if self.scan:
            return _SCAN_TYPES.get((module, name), _ANY)
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise _Unsupported(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is not tuple or len(pid) not in (5, 6) or pid[0] not in _STORAGE_PID:
            raise _Unsupported("persistent id")
        typ, key, location, numel = pid[1:5]  # a legacy pickle adds view metadata
        if self.scan:
            if key not in self.nbytes:
                known = type(typ) is _StorageType and type(key) in (str, int) and type(numel) is int and numel >= 0
                self.nbytes[key] = numel * typ.itemsize if known else None
            return _ANY
        if len(pid) != 5 or pid[0] != "storage" or type(typ) is not _StorageType or type(key) is not str:
            raise _Unsupported("storage")
        if type(location) is not str or type(numel) is not int or not 0 <= numel < _INT64:
            raise _Unsupported("storage")
        dtype = _STORAGES[typ.name]
        storage = self.storages.setdefault(key, _Storage(key, dtype, typ.itemsize, numel))
        if storage.dtype != dtype or storage.numel != numel:
            raise _Unsupported("storage seen with two types")  # torch keeps the first: not modelled
        return storage

    def call(self, func: Any, args: Any) -> Any:
        """REDUCE: torch calls any allow-listed global with ``*args``."""
        if self.scan:
            return _ANY
        if type(args) is not tuple or not (func in (OrderedDict, argparse.Namespace) or func in _REBUILDS):
            raise _Unsupported("call")
        return func(*args)

    def build(self, inst: Any, state: Any) -> None:
        """BUILD: torch sets a tensor's storage (``set_``) or an object's ``__dict__``; the index takes only a
        dict of attributes on an OrderedDict or a Namespace (``_metadata``, ``args``), as torch.save writes."""
        if self.scan:
            return
        if type(inst) not in (OrderedDict, argparse.Namespace) or type(state) is not dict:
            raise _Unsupported("BUILD")
        inst.__dict__.update(state)

    def load(self) -> Any:
        read, readline = self.file.read, self.file.readline
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        memo: dict[int, Any] = {}
        scan = self.scan
        while True:
            key = read(1)
            if not key:
                raise _Unsupported("truncated pickle")
            op = key[0]
            if op == _BINPUT:
                memo[read(1)[0]] = stack[-1]
            elif op == _BINGET:
                stack.append(memo[read(1)[0]])
            elif op == _LONG_BINPUT:
                memo[_U32(read(4))[0]] = stack[-1]
            elif op == _LONG_BINGET:
                stack.append(memo[_U32(read(4))[0]])
            elif op == _BINUNICODE:
                stack.append(str(read(_U32(read(4))[0]), "utf-8", "surrogatepass"))
            elif op == _MARK:
                metastack.append(stack)
                stack = []
            elif op == _TUPLE:
                items, stack = stack, metastack.pop()
                stack.append(tuple(items))
            elif op == _TUPLE1:
                stack[-1] = (stack[-1],)
            elif op == _TUPLE2:
                stack[-2:] = [(stack[-2], stack[-1])]
            elif op == _TUPLE3:
                stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
            elif op == _BINPERSID:
                stack.append(self.persistent_load(stack.pop()))
            elif op == _REDUCE:
                args = stack.pop()
                stack[-1] = self.call(stack[-1], args)
            elif op == _BININT1:
                stack.append(read(1)[0])
            elif op == _BININT2:
                stack.append(_U16(read(2))[0])
            elif op == _BININT:
                stack.append(_I32(read(4))[0])
            elif op == _LONG1:
                stack.append(pickle.decode_long(read(read(1)[0])))
            elif op == _BINFLOAT:
                stack.append(_F64(read(8))[0])
            elif op == _SHORT_BINSTRING:
                stack.append(read(read(1)[0]).decode("utf-8", "strict"))
            elif op == _NONE:
                stack.append(None)
            elif op == _NEWFALSE:
                stack.append(False)
            elif op == _NEWTRUE:
                stack.append(True)
            elif op == _EMPTY_TUPLE:
                stack.append(())
            elif op == _EMPTY_LIST:
                stack.append([])
            elif op == _EMPTY_DICT:
                stack.append({})
            elif op == _EMPTY_SET:
                stack.append(set())
            elif op == _GLOBAL:
                module = readline()[:-1].decode("utf-8")
                name = readline()[:-1].decode("utf-8")
                stack.append(self.find_class(module, name))
            elif op == _NEWOBJ:
                args, cls = stack.pop(), stack.pop()
                if scan:
                    stack.append(_ANY)
                elif cls in (OrderedDict, argparse.Namespace) and type(args) is tuple:
                    stack.append(cls.__new__(cls, *args))
                else:
                    raise _Unsupported("NEWOBJ")
            elif op == _BUILD:
                state = stack.pop()
                self.build(stack[-1], state)
            elif op in (_SETITEM, _SETITEMS):
                if op == _SETITEM:
                    value, k = stack.pop(), stack.pop()
                    items = [k, value]
                else:
                    items, stack = stack, metastack.pop()
                target = stack[-1]
                if type(target) not in (dict, OrderedDict) and not (scan and target is _ANY):
                    raise _Unsupported("SETITEMS on something else than a dict")
                if target is not _ANY:
                    for i in range(0, len(items), 2):
                        target[items[i]] = items[i + 1]
            elif op in (_APPEND, _APPENDS):
                if op == _APPEND:
                    items = [stack.pop()]
                else:
                    items, stack = stack, metastack.pop()
                target = stack[-1]
                if type(target) is not list and not (scan and target is _ANY):
                    raise _Unsupported("APPENDS on something else than a list")
                if type(target) is list:
                    target.extend(items)
            elif op == _PROTO:
                _ = read(1)[0]  # torch reads (and only warns about) any protocol
            elif op == _STOP:
                return stack.pop()
            else:
                raise _Unsupported(f"opcode {key!r}")


_REBUILDS = (_rebuild_tensor, _rebuild_parameter)
_U32, _U16, _I32, _F64 = (struct.Struct(f).unpack for f in ("<I", "<H", "<i", ">d"))
(
    _BINPUT, _BINGET, _BINUNICODE, _MARK, _TUPLE, _TUPLE1, _TUPLE2, _TUPLE3, _BININT1, _BININT2, _BININT, _LONG1,
    _BINFLOAT, _SHORT_BINSTRING, _NONE, _NEWFALSE, _NEWTRUE, _EMPTY_TUPLE, _EMPTY_LIST, _EMPTY_DICT, _EMPTY_SET,
    _GLOBAL, _BINPERSID, _REDUCE, _NEWOBJ, _BUILD, _SETITEM, _SETITEMS, _APPEND, _APPENDS, _LONG_BINPUT,
    _LONG_BINGET, _PROTO, _STOP,
) = (
    pickle.BINPUT[0], pickle.BINGET[0], pickle.BINUNICODE[0], pickle.MARK[0], pickle.TUPLE[0], pickle.TUPLE1[0],
    pickle.TUPLE2[0], pickle.TUPLE3[0], pickle.BININT1[0], pickle.BININT2[0], pickle.BININT[0], pickle.LONG1[0],
    pickle.BINFLOAT[0], pickle.SHORT_BINSTRING[0], pickle.NONE[0], pickle.NEWFALSE[0], pickle.NEWTRUE[0],
    pickle.EMPTY_TUPLE[0], pickle.EMPTY_LIST[0], pickle.EMPTY_DICT[0], pickle.EMPTY_SET[0], pickle.GLOBAL[0],
    pickle.BINPERSID[0], pickle.REDUCE[0], pickle.NEWOBJ[0], pickle.BUILD[0], pickle.SETITEM[0], pickle.SETITEMS[0],
    pickle.APPEND[0], pickle.APPENDS[0], pickle.LONG_BINPUT[0], pickle.LONG_BINGET[0], pickle.PROTO[0], pickle.STOP[0],
)  # fmt: skip


@dataclass(frozen=True)
class ZipIndex:
    """``container``: ``data.pkl`` with :class:`TensorRef` for tensors; ``ranges``: storage key -> (offset, size)
    of its bytes in the file."""

    container: Any
    ranges: dict[str, tuple[int, int]]

    def file_range(self, t: TensorRef) -> tuple[int, int] | None:
        """``(file offset, length)`` of a contiguous tensor's bytes, or ``None``."""
        r = self.ranges.get(t.storage.key)
        if r is None or not t.nbytes or not t.is_contiguous():
            return None
        start = t.offset * t.storage.itemsize
        if start + t.nbytes > r[1]:
            return None
        return r[0] + start, t.nbytes


def data_offset(f: Any, info: zipfile.ZipInfo) -> int:
    """File offset of a stored member's data (after its local header, whose extra field may differ)."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"no local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return int(info.header_offset + 30 + name_len + extra_len)


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    """A member's name as miniz compares it: the bytes of the central directory, ASCII letters folded."""
    return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437").lower()


def _members(path: Path, z: zipfile.ZipFile) -> tuple[dict[bytes, zipfile.ZipInfo], bytes]:
    """Members by name as torch looks them up, and torch's archive folder (``b"<name>/"``, from the first entry).

    Raises:
        CheckpointFormatError: a name holds a NUL byte, or two members share a name.
    """
    members: dict[bytes, zipfile.ZipInfo] = {}
    for info in z.infolist():
        if info.filename != info.orig_filename or "\0" in info.orig_filename:
            raise CheckpointFormatError(
                f"{path}: zip member {info.orig_filename!r} has a NUL byte in its name, which zip readers cut "
                f"differently (a corrupt or crafted file); get an intact copy of the checkpoint"
            )
        name = _raw_name(info)
        if name in members:
            raise CheckpointFormatError(
                f"{path}: zip member {info.filename!r} appears twice (names compare case-insensitively), and "
                f"torch.load reads one copy or the other by its own lookup (a corrupt or crafted file); get an "
                f"intact copy of the checkpoint"
            )
        members[name] = info
    first = z.infolist()[0] if members else None
    if first is None or b"/" not in _raw_name(first):
        raise _Unsupported("no archive folder")  # torch refuses it
    return members, _raw_name(first).split(b"/")[0] + b"/"


def _check_sizes(path: Path, members: dict[bytes, zipfile.ZipInfo], size: int) -> None:
    """Every member's sizes as miniz checks them when torch opens the archive (``mz_zip_reader_read_central_dir``):
    a stored member's two sizes agree, a member with data has compressed bytes, and they lie inside the file.
    Sizes of 0xFFFFFFFF (a zip64 field without its extra record) are refused too: miniz fails to read them.

    Raises:
        CheckpointFormatError: one line naming the member.
    """
    corrupt = "(a corrupt or crafted file, which torch.load refuses); get an intact copy of the checkpoint"
    for info in members.values():
        comp, full = info.compress_size, info.file_size
        if 0xFFFFFFFF in (comp, full) and not info.extra:
            raise CheckpointFormatError(
                f"{path}: zip member {info.filename!r} declares a size of 0xFFFFFFFF without the zip64 record "
                f"that would hold it {corrupt}"
            )
        if (info.compress_type == zipfile.ZIP_STORED and comp != full) or (full and not comp):
            raise CheckpointFormatError(
                f"{path}: zip member {info.filename!r} declares {comp} bytes stored for {full} {corrupt}"
            )
        if info.header_offset + 30 + comp > size:
            raise CheckpointFormatError(
                f"{path}: zip member {info.filename!r} declares {comp} bytes from offset {info.header_offset}, "
                f"past the end of the file ({size} bytes) {corrupt}"
            )


def _check_records(path: Path, members: dict[bytes, zipfile.ZipInfo], prefix: bytes) -> None:
    """The members torch reads whole are at most MAX_RECORD bytes and inflate at most MAX_RATIO times."""
    for record in _RECORDS:
        info = members.get(prefix + record.encode())
        if info is None:
            continue
        if info.file_size > MAX_RECORD:
            raise CheckpointFormatError(
                f"{path}: zip member {info.filename!r} declares {info.file_size} bytes, over the "
                f"{MAX_RECORD >> 20} MiB that torch.load may read whole into memory (a zip bomb?); get an intact "
                f"copy of the checkpoint"
            )
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise CheckpointFormatError(
                f"{path}: zip member {info.filename!r} inflates {info.compress_size} bytes to {info.file_size}, "
                f"over {MAX_RATIO} times (a zip bomb?); get an intact copy of the checkpoint"
            )


def _read_record(f: BinaryIO, info: zipfile.ZipInfo) -> bytes:
    """A member as miniz extracts it for torch (no CRC check), reading at most its declared size + 1 bytes."""
    if info.file_size > MAX_RECORD or info.compress_size > MAX_RECORD:
        raise _Unsupported("record size")
    f.seek(data_offset(f, info))
    raw = f.read(info.compress_size)
    if len(raw) != info.compress_size:
        raise _Unsupported("record cut short")
    if info.compress_type == zipfile.ZIP_STORED:
        data = raw
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        data = inflate.decompress(raw, info.file_size + 1)  # a lie about the size shows as one byte more
        if not inflate.eof:
            raise _Unsupported("record inflates past its declared size")
    else:
        raise _Unsupported("compression method")
    if len(data) != info.file_size:
        raise _Unsupported("record size")
    return data


def _end_record_agrees(f: BinaryIO, z: zipfile.ZipFile) -> bool:
    """miniz reads as many central directory entries as the end record counts, where the record says; zipfile
    reads all that fit its size, where it finds them. True when both read the same entries."""
    size = f.seek(0, io.SEEK_END)
    f.seek(max(0, size - 22 - 0xFFFF))
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return False
    n, (entries, _, offset) = len(z.infolist()), struct.unpack_from("<HII", tail, at + 10)
    if at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":  # zip64: the locator points at the zip64 record
        f.seek(struct.unpack_from("<Q", tail, at - 12)[0])
        rec = f.read(56)
        if len(rec) < 56 or rec[:4] != b"PK\x06\x06":
            return False
        (entries64,) = struct.unpack_from("<Q", rec, 32)
        (offset64,) = struct.unpack_from("<Q", rec, 48)
        if entries not in (n, 0xFFFF) or offset not in (offset64, 0xFFFFFFFF):
            return False
        entries, offset = entries64, offset64
    return bool(entries == n and offset == z.start_dir)


def _storage_member(members: dict[bytes, zipfile.ZipInfo], prefix: bytes, key: Any) -> zipfile.ZipInfo | None:
    return members.get(prefix + f"data/{key}".encode().lower())


def read_zip_index(path: Path) -> ZipIndex | None:
    """The index of a torch zip checkpoint, or ``None`` when torch.load must read it (see the module doc)."""
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            members, prefix = _members(path, z)
            _check_sizes(path, members, f.seek(0, io.SEEK_END))
            _check_records(path, members, prefix)
            if not _end_record_agrees(f, z):
                return None
            for record in _RECORDS:  # torch reads each of them: a broken local header fails torch.load
                if prefix + record.encode() in members:
                    raw = _read_record(f, members[prefix + record.encode()])
                    if record == ".data/serialization_id":
                        raw.decode()  # torch.load hands it to Python as a str: it fails on bytes that are not UTF-8
            version = members.get(prefix + b".data/version", members.get(prefix + b"version"))
            if version is None:
                return None
            digits = _read_record(f, version).removesuffix(b"\n")
            if not digits.isdigit() or not 1 <= int(digits) <= _MAX_VERSION:
                return None
            order = members.get(prefix + b"byteorder")
            if order is not None and _read_record(f, order) != b"little":
                return None
            alignment = members.get(prefix + b".storage_alignment")
            if alignment is not None:
                int(_read_record(f, alignment))  # torch.load fails where this does
            unpickler = _Unpickler(io.BytesIO(_read_record(f, members[prefix + b"data.pkl"])))
            container = unpickler.load()
            ranges = {}
            size = f.seek(0, io.SEEK_END)
            for key, storage in unpickler.storages.items():
                info = _storage_member(members, prefix, key)
                nbytes = storage.numel * storage.itemsize
                if info is None or info.compress_type != zipfile.ZIP_STORED or info.file_size != nbytes:
                    return None
                start = data_offset(f, info)
                if info.compress_size != nbytes or start + nbytes > size:
                    return None
                ranges[key] = (start, nbytes)
    except Exception:  # any doubt: torch.load reads the file and reports (after check_zip)
        return None
    return ZipIndex(container, ranges)


def check_zip(path: Path) -> bool:
    """Refuse a torch zip checkpoint that torch.load must not be handed or reads differently with and without
    ``mmap`` (see the module doc); True when every storage member was found to hold the bytes ``data.pkl``
    declares for it, so that ``torch.load(mmap=True)`` reads exactly those. False when that could not be told
    (a pickle this module cannot follow): load it with ``mmap=False``, which checks each member's size itself.

    Raises:
        CheckpointFormatError: one line, naming the member and how to fix it.
    """
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            members, prefix = _members(path, z)
            size = f.seek(0, io.SEEK_END)
            _check_sizes(path, members, size)
            _check_records(path, members, prefix)
            for name, member in members.items():
                if name.startswith(prefix + b"data/") and member.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointFormatError(
                        f"{path}: tensor data member {member.filename!r} is compressed, and torch.load reads it "
                        f"differently with and without mmap; load it with torch.load(mmap=False) where you trust "
                        f"it and save it again with torch.save, which stores tensor data uncompressed"
                    )
            unpickler = _Unpickler(io.BytesIO(_read_record(f, members[prefix + b"data.pkl"])), scan=True)
            unpickler.load()
            checked = True
            for key, nbytes in unpickler.nbytes.items():
                info = _storage_member(members, prefix, key)
                if nbytes is None or info is None:  # unknown size, or missing: torch.load tells
                    checked = False
                    continue
                if info.file_size != nbytes or info.compress_size != nbytes:
                    raise CheckpointFormatError(
                        f"{path}: tensor data member {info.filename!r} holds {info.file_size} bytes but data.pkl "
                        f"declares {nbytes} for storage {key!r}, so torch.load reads other bytes with mmap and "
                        f"refuses the file without (a corrupt or crafted file); get an intact copy of the checkpoint"
                    )
                if data_offset(f, info) + nbytes > size:
                    raise CheckpointFormatError(
                        f"{path}: tensor data member {info.filename!r} ends past the end of the file (truncated?); "
                        f"get an intact copy of the checkpoint"
                    )
    except CheckpointFormatError:
        raise
    except Exception:  # a pickle or a zip this cannot follow: torch.load decides, checking sizes itself
        return False
    return checked


_LEGACY_HEADERS = 3  # a legacy pickle: magic number, protocol version, sys info, then the container


def check_legacy(path: Path) -> None:
    """Refuse a legacy (non-zip) torch pickle whose storages declare more bytes than the file holds.

    torch.load reads such a file whole, allocating each storage at the size ``data.pkl`` declares before
    reading it: a few bytes could ask for terabytes. Anything this cannot follow is left to torch.load.

    Raises:
        CheckpointFormatError: one line.
    """
    try:
        with open(path, "rb") as f:
            for _ in range(_LEGACY_HEADERS):
                _Unpickler(f, scan=True).load()
            unpickler = _Unpickler(f, scan=True)
            unpickler.load()
            size = f.seek(0, io.SEEK_END)
    except Exception:
        return
    declared = sum(n for n in unpickler.nbytes.values() if n)
    if declared > size:
        raise CheckpointFormatError(
            f"{path}: its storages declare {declared} bytes of tensor data but the file holds {size} bytes "
            f"(a truncated or crafted file); get an intact copy of the checkpoint"
        )


def is_tensor_ref(x: Any) -> bool:
    return isinstance(x, TensorRef)
