"""``--verify``: hash every pass-through tensor of the written output and of the input, and compare.

Runs on the temp file (or folder) before it is renamed into place, so a failed check leaves no output. Both sides
are read through their readers' segments (:meth:`~vitresize.formats.base.Checkpoint.segments`): a tensor whose bytes
lie as they are in a file is hashed from that byte range (``pread``, no torch), any other from its loaded bytes.
Hashes are SHA-256, read in chunks.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InternalError
from .formats import ROOT
from .report import Verification

if TYPE_CHECKING:
    from .formats import Checkpoint
    from .formats.base import Key, Segment, TensorPath

__all__ = ["verify_output"]

_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class _Digest:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    sha256: str


class _Hasher:
    """Digests of segments, each computed once (a tensor shared by several paths is one segment), with one
    descriptor per file read."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._done: dict[int, _Digest] = {}

    def digest(self, seg: Segment) -> _Digest:
        d = self._done.get(id(seg))
        if d is None:
            h = hashlib.sha256()
            if seg.source is not None:
                self._hash_range(h, *seg.source, seg.nbytes)
            else:
                from .formats.safetensors import tensor_bytes

                raw = tensor_bytes(seg.load())
                for i in range(0, len(raw), _CHUNK):
                    h.update(raw[i : i + _CHUNK])
            d = self._done[id(seg)] = _Digest(seg.dtype, seg.shape, seg.nbytes, h.hexdigest())
        return d

    def _hash_range(self, h: hashlib._Hash, path: Path, start: int, length: int) -> None:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        offset, end = start, start + length
        while offset < end:
            chunk = os.pread(fd, min(_CHUNK, end - offset), offset)
            if not chunk:
                raise InternalError(f"verification failed: {path} ended at byte {offset}, expected {end}")
            h.update(chunk)
            offset += len(chunk)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)


def verify_output(
    ckpt: Checkpoint, out: Checkpoint, whole_container: bool, state_dicts: tuple[str, ...], changed: set[Key]
) -> Verification:
    """Compare every tensor of ``out`` that was not resampled with the same tensor of the input ``ckpt``.

    Args:
        ckpt: the input.
        out: the output, opened by its reader.
        whole_container: the output keeps the input's container (every tensor by the same path), rather than
            holding ``state_dicts[0]`` as a flat state dict.
        state_dicts: the state dicts written.
        changed: the resampled tensors, left out of the comparison.

    Raises:
        InternalError: a tensor is missing, or its dtype, shape or bytes differ (a vitresize bug).
    """
    src: dict[TensorPath, Segment]
    got: dict[TensorPath, Segment]
    if whole_container:
        src, got = ckpt.tensors(), out.tensors()
        skip = {ckpt.tensor_path(sd, k) for sd, k in changed}
    else:
        sd = state_dicts[0]
        src = {(s.key,): s for s in ckpt.segments(sd)}
        got = {(s.key,): s for s in out.segments(ROOT)}
        skip = {(k,) for s, k in changed if s == sd}
    paths = [p for p in dict.fromkeys([*src, *got]) if p not in skip]
    hasher = _Hasher()
    total = 0
    try:
        for p in paths:
            name = "/".join(str(part) for part in p)
            a, b = got.get(p), src.get(p)
            if a is None or b is None:
                where = "output" if a is None else "input"
                raise InternalError(f"verification failed: tensor {name!r} is missing from the {where}")
            da, db = hasher.digest(a), hasher.digest(b)
            if da != db:
                raise InternalError(
                    f"verification failed: tensor {name!r} differs from the input "
                    f"({db.dtype} {list(db.shape)} -> {da.dtype} {list(da.shape)}); nothing was written"
                )
            total += da.nbytes
    finally:
        hasher.close()
    return Verification(tensors=len(paths), bytes=total)
