"""What a torch zip checkpoint holds, read without torch: ``data.pkl`` through a tiny allow-listed unpickler.

``torch.save`` writes a zip of stored (uncompressed) members: ``<name>/data.pkl`` (the container, with each
tensor pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` and each storage as
a persistent id ``("storage", torch.FloatStorage, key, location, numel)``) and ``<name>/data/<key>`` (the
storage bytes). This module unpickles ``data.pkl`` into plain Python objects with :class:`TensorRef` in place
of tensors, and finds each storage's byte range in the file, so that a conversion can plan its output and
start copying before ``import torch`` (1.6 s here) has finished, and ``inspect`` never imports torch.

It is an index, not a loader, and no safety boundary: anything it does not know (a global outside its
allow-list, a big-endian file, a compressed member, ...) makes :func:`read_zip_index` return ``None``, and
the caller loads the file with ``torch.load(weights_only=True)``, which decides and reports. Tensor data is
always materialized by torch.
"""

from __future__ import annotations

import argparse
import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._dtypes import ST_DTYPES, TORCH_TO_ST

__all__ = ["TensorRef", "ZipIndex", "data_offset", "is_tensor_ref", "read_zip_index"]

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
_MAX_PICKLE = 256 * 1024 * 1024  # data.pkl holds no tensor data; a bigger one is not a checkpoint we index


class _Unsupported(Exception):
    """Something this index does not model; torch.load decides."""


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    itemsize: int
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the checkpoint, as ``data.pkl`` describes it (no data)."""

    storage: _Storage
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]

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
    if not isinstance(x, tuple) or not all(type(i) is int and i >= 0 for i in x):
        raise _Unsupported("size or stride")
    return x


def _rebuild_tensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorRef:
    if not isinstance(storage, _Storage) or type(storage_offset) is not int or storage_offset < 0:
        raise _Unsupported("tensor")
    shape, strides = _ints(size), _ints(stride)
    if len(shape) != len(strides) or backward_hooks or metadata:
        raise _Unsupported("tensor with hooks or metadata")
    return TensorRef(storage, storage_offset, shape, strides)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> TensorRef:
    if not isinstance(data, TensorRef) or backward_hooks:
        raise _Unsupported("parameter")
    return data


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGES},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only :data:`_GLOBALS` (every global, ``INST``/``OBJ`` and extension code goes through
    :meth:`find_class`), so unpickling builds containers, strings, numbers and the stubs above, nothing else."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise _Unsupported(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Unsupported("persistent id")
        typ, key, _location, numel = pid[1:]
        if not isinstance(typ, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _Unsupported("storage")
        dtype = _STORAGES[typ.name]
        itemsize = ST_DTYPES[TORCH_TO_ST[dtype]][1]
        storage = self.storages.setdefault(key, _Storage(key, dtype, itemsize, numel))
        if storage.dtype != dtype or storage.numel != numel:
            raise _Unsupported("storage seen with two types")
        return storage


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


def read_zip_index(path: Path) -> ZipIndex | None:
    """The index of a torch zip checkpoint, or ``None`` when torch.load must read it (see the module doc)."""
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            infos = {i.filename: i for i in z.infolist()}
            pkls = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                return None
            prefix = pkls[0][: -len("data.pkl")]
            order = infos.get(prefix + "byteorder")
            if order is not None and z.read(order) != b"little":
                return None
            if infos[pkls[0]].file_size > _MAX_PICKLE:
                return None
            unpickler = _Unpickler(z.read(pkls[0]))
            container = unpickler.load()
            ranges = {}
            for key, storage in unpickler.storages.items():
                info = infos.get(f"{prefix}data/{key}")
                nbytes = storage.numel * storage.itemsize
                if info is None or info.compress_type != zipfile.ZIP_STORED or info.file_size != nbytes:
                    return None
                ranges[key] = (data_offset(f, info), nbytes)
    except Exception:  # any doubt: torch.load reads the file and reports
        return None
    return ZipIndex(container, ranges)


def is_tensor_ref(x: Any) -> bool:
    return isinstance(x, TensorRef)
