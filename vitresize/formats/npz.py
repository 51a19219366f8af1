"""JAX ``.npz`` checkpoints (vit_jax, big_vision): a zip of ``.npy`` members named by ``/``-separated paths.

Read: member headers only (``np.lib.format``), never pickles (``allow_pickle=False``); arrays are read one
at a time when used. big_vision stores bfloat16 as raw 2-byte arrays (``|V2``); they read as bfloat16 and
are written back as raw 2-byte arrays. Write: an ``.npz`` in the input's member order and compression, the
unchanged members copied as they are stored (block-congruent with the input where large: a copy-on-write file
system clones them), the JAX layout (HWIO kernels) kept.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import CheckpointFormatError, UsageError
from ..keymaps import TensorInfo
from ._dtypes import TORCH_TO_ST
from ._zip_index import data_offset
from ._zip_write import Member, write_zip
from .base import ROOT, Checkpoint, WriteJob, Writer, Written

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ._copy import Progress

__all__ = ["NpzCheckpoint", "NpzWriter", "write_npz"]

_RAW_BF16 = "V2"
_CHECK_CHUNK = 16 * 1024 * 1024


def _dtype_name(dtype: np.dtype[Any]) -> str | None:
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None:
        return "bfloat16"  # big_vision's raw bfloat16
    return dtype.name if dtype.name in TORCH_TO_ST else None  # NumPy and torch share these names


def _read_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    import numpy as np

    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy version {version}")


class NpzCheckpoint(Checkpoint):
    """A ``.npz`` file: one flat state dict of ``/``-separated keys, read member by member."""

    writer: ClassVar[str] = "npz"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.format = "npz"
        self.lazy = True
        self.metadata = {}
        self.extras = []
        self.members: dict[str, zipfile.ZipInfo] = {}
        self.raw_bf16: set[str] = set()
        infos: dict[str, TensorInfo] = {}
        try:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if not info.filename.endswith(".npy"):
                        raise CheckpointFormatError(f"{path}: member {info.filename!r} is not a .npy array")
                    key = info.filename[: -len(".npy")]
                    with z.open(info) as f:
                        shape, _fortran, dtype = _read_header(f)
                        header = f.tell()
                    name = _dtype_name(dtype)
                    if name is None:
                        raise CheckpointFormatError(
                            f"{path}: array {key!r} has dtype {dtype} (object arrays need pickle, which vitresize "
                            f"never loads; other dtypes are not weights)"
                        )
                    want = header + math.prod(shape) * dtype.itemsize
                    if info.file_size != want:
                        raise CheckpointFormatError(
                            f"{path}: array {key!r} holds {info.file_size - header} bytes of data, its header "
                            f"says {want - header} (truncated or corrupt?)"
                        )
                    if dtype.kind == "V":
                        self.raw_bf16.add(key)
                    self.members[key] = info
                    infos[key] = TensorInfo(tuple(int(s) for s in shape), name)
        except CheckpointFormatError:
            raise
        except Exception as e:  # zipfile and np.lib.format raise many kinds on garbage
            raise CheckpointFormatError(f"cannot read {path} as .npz: {e} (truncated or corrupt?)") from None
        self.state_dicts = {ROOT: infos}

    def array(self, key: str) -> np.ndarray[Any, Any]:
        """One array as stored (raw bfloat16 as ``|V2``), read with ``allow_pickle=False``."""
        import numpy as np

        try:
            with zipfile.ZipFile(self.path) as z, z.open(self.members[key]) as f:
                arr: np.ndarray[Any, Any] = np.lib.format.read_array(f, allow_pickle=False)
        except Exception as e:
            raise CheckpointFormatError(f"{self.path}: cannot read array {key!r}: {e}") from None
        return arr

    def tensor(self, state_dict: str, key: str) -> torch.Tensor:
        import numpy as np
        import torch

        arr = self.array(key)
        # Native byte order (torch refuses any other, and .safetensors/.pth hold little-endian bytes); the .npz
        # writer copies unchanged members as stored, so big-endian arrays stay big-endian there.
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
        if key in self.raw_bf16:
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)


def _to_numpy(t: torch.Tensor, raw_bf16: bool) -> np.ndarray[Any, Any]:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        arr = t.view(torch.int16).numpy()
        return arr.view(_RAW_BF16)  # raw 2-byte arrays, as big_vision writes them
    return t.numpy()


class NpzWriter(Writer):
    """``.npz``: the input ``.npz`` with the changed arrays replaced, in the JAX layout (HWIO kernels)."""

    format: ClassVar[str] = "npz"
    suffixes: ClassVar[tuple[str, ...]] = (".npz",)

    def check_source(self, ckpt: Checkpoint) -> None:
        if not isinstance(ckpt, NpzCheckpoint):
            raise UsageError(
                f"a .npz output needs a .npz input (JAX layout); write {ckpt.format} input as .safetensors"
            )

    def write(self, out: Path, job: WriteJob, progress: Progress | None) -> Written:
        ckpt = job.checkpoint
        assert isinstance(ckpt, NpzCheckpoint)  # check_source refused any other
        return Written(write_npz(ckpt, {k: r.load() for (_, k), r in job.replacements.items()}, out, progress))


def write_npz(
    ckpt: NpzCheckpoint, changed: dict[str, torch.Tensor], dst: Path, progress: Progress | None = None
) -> int:
    """Write ``ckpt`` to ``dst`` with the ``changed`` arrays replaced; every other member is copied as it is
    stored (compressed or not, its CRC checked), the large ones block-congruent with the input
    (:mod:`._zip_write`), so a copy-on-write file system clones them. Returns the bytes written."""
    try:
        members = _members(ckpt, changed)
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError, OSError) as e:  # a bad local header or CRC
        raise CheckpointFormatError(f"{ckpt.path} is corrupt: {e}; re-download or re-save it") from None
    return write_zip(dst, members, progress)


def _members(ckpt: NpzCheckpoint, changed: dict[str, torch.Tensor]) -> list[Member]:
    import io

    import numpy as np

    out = []
    with open(ckpt.path, "rb") as f:
        for key, info in ckpt.members.items():
            if key in changed:
                buf = io.BytesIO()
                np.lib.format.write_array(buf, _to_numpy(changed[key], key in ckpt.raw_bf16), allow_pickle=False)
                data = buf.getvalue()
                crc, size = zlib.crc32(data), len(data)
                method = zipfile.ZIP_STORED if info.compress_type == zipfile.ZIP_STORED else zipfile.ZIP_DEFLATED
                if method == zipfile.ZIP_DEFLATED:  # compressed as the input's was (bzip2 and lzma: deflated)
                    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
                    data = deflate.compress(data) + deflate.flush()
                member = Member(
                    info.filename,
                    size,
                    data=data,
                    stored_size=len(data),
                    compress_type=method,
                    crc=crc,
                    date_time=info.date_time,
                    external_attr=info.external_attr,
                )
            else:
                known = info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
                if not known:  # bzip2, lzma: checked through zipfile (it checks the CRC)
                    import lzma

                    try:
                        with zipfile.ZipFile(ckpt.path) as z, z.open(info) as member_file:
                            while member_file.read(_CHECK_CHUNK):
                                pass
                    except lzma.LZMAError as e:
                        raise zipfile.BadZipFile(f"member {info.filename!r}: {e}") from None
                member = Member(
                    info.filename,
                    info.file_size,
                    source=(ckpt.path, data_offset(f, info)),
                    stored_size=info.compress_size,
                    compress_type=info.compress_type,
                    crc=info.CRC,
                    verify=known,
                    date_time=info.date_time,
                    external_attr=info.external_attr,
                    flag_bits=info.flag_bits & 0x6,  # the method's options (LZMA's end-of-stream marker)
                )
            out.append(member)
    return out
