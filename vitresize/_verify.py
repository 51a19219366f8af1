"""``--verify``: hash every pass-through tensor of the written file and of the input, and compare.

Runs on the temp file before it is renamed into place, so a failed check leaves no output. Hashes are
SHA-256 over each tensor's raw bytes, read in chunks: a safetensors file by byte range, a torch file
through its (memory-mapped) tensors.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import VitresizeError
from .formats import ROOT

if TYPE_CHECKING:
    from .formats import Checkpoint

__all__ = ["Verification", "verify_output"]

_CHUNK = 8 * 1024 * 1024
Path_ = tuple[Any, ...]  # keys from the container root down to a tensor


@dataclass(frozen=True)
class Verification:
    """What ``--verify`` compared: pass-through tensors found byte-identical to the input."""

    tensors: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "bytes": self.bytes, "identical": True}


@dataclass(frozen=True)
class _Digest:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    sha256: str


def _hash_range(fd: int, start: int, end: int) -> str:
    h = hashlib.sha256()
    offset = start
    while offset < end:
        chunk = os.pread(fd, min(_CHUNK, end - offset), offset)
        if not chunk:
            raise VitresizeError(f"verification failed: file ended at byte {offset}, expected {end}")
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _safetensors_digests(path: Path, keys: set[str] | None) -> dict[Path_, _Digest]:
    from .formats._dtypes import ST_DTYPES
    from .formats.safetensors import read_header

    _, entries, _ = read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return {
            (k,): _Digest(ST_DTYPES[e.dtype][0], e.shape, e.end - e.start, _hash_range(fd, e.start, e.end))
            for k, e in entries.items()
            if keys is None or k in keys
        }
    finally:
        os.close(fd)


def _walk(obj: Any, containers: dict[int, Path_] | None = None) -> Iterator[tuple[Path_, Any]]:
    """Every tensor in a container of dicts, lists and tuples, with its path. Each container is walked once, under
    the first path that reaches it depth-first (as :func:`~.formats.torch_pickle.iter_state_dicts` names state
    dicts): a dict shared by two keys, or a crafted file of shared nested dicts, is not walked once per path."""
    import torch

    seen: set[int] = set()
    stack: list[tuple[Path_, Any]] = [((), obj)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, torch.Tensor):
            yield path, node
            continue
        if isinstance(node, Mapping):
            items: list[tuple[Any, Any]] = list(node.items())
        elif isinstance(node, (list, tuple)):
            items = list(enumerate(node))
        else:
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if containers is not None:  # where each container is walked: the path its tensors are yielded under
            containers[id(node)] = path
        stack.extend(((*path, k), v) for k, v in reversed(items))


def _at_node(obj: Any, path: Path_) -> Any:
    """What lies at ``path`` in a container of dicts, lists and tuples, or ``None``."""
    for part in path:
        try:
            obj = obj[part]
        except (KeyError, IndexError, TypeError):
            return None
    return obj


def _at(obj: Any, path: Path_) -> Any:
    """The tensor at ``path`` in a container of dicts, lists and tuples, or ``None``."""
    import torch

    obj = _at_node(obj, path)
    return obj if isinstance(obj, torch.Tensor) else None


def _tensor_digest(t: Any) -> _Digest:
    from .formats.safetensors import tensor_bytes

    raw = tensor_bytes(t)
    h = hashlib.sha256()
    for i in range(0, len(raw), _CHUNK):
        h.update(raw[i : i + _CHUNK])
    return _Digest(str(t.dtype).removeprefix("torch."), tuple(t.shape), len(raw), h.hexdigest())


def _torch_digests(obj: Any, keep: set[Path_] | None = None) -> dict[Path_, _Digest]:
    """Digests by path; a tensor met under several paths is hashed once."""
    by_id: dict[int, _Digest] = {}
    out = {}
    for p, t in _walk(obj):
        if keep is None or p in keep:
            if id(t) not in by_id:
                by_id[id(t)] = _tensor_digest(t)
            out[p] = by_id[id(t)]
    return out


def _sd_path(ckpt: Checkpoint, name: str) -> Path_:
    """The keys leading to a state dict (a name joins them with ``/``, which a key of a .pth may hold)."""
    from .formats.torch_pickle import TorchCheckpoint

    if isinstance(ckpt, TorchCheckpoint):
        return ckpt.path_of(name)
    return tuple(name.split("/")) if name != ROOT else ()


def verify_output(
    ckpt: Checkpoint, out: Path, out_format: str, state_dicts: tuple[str, ...], changed: set[tuple[str, str]]
) -> Verification:
    """Compare every tensor of ``out`` that was not resampled with the same tensor of the input.

    Raises:
        VitresizeError: a tensor is missing, or its dtype, shape or bytes differ (a vitresize bug).
    """
    from .formats.safetensors import SafetensorsCheckpoint
    from .formats.torch_pickle import TorchCheckpoint, load_container

    # What the output should hold unchanged, as (path in the output) -> (path in the input).
    if out_format == "safetensors":
        sd = state_dicts[0]
        expect = {(k,): (*_sd_path(ckpt, sd), k) for k in ckpt.state_dicts[sd] if (sd, k) not in changed}
        got = _safetensors_digests(out, {p[0] for p in expect})
    elif out_format == "npz":
        from .formats.npz import NpzCheckpoint

        written = NpzCheckpoint(out)
        expect = {(k,): (k,) for k in ckpt.state_dicts[ROOT] if (ROOT, k) not in changed}
        got = {(k,): _tensor_digest(written.tensor(ROOT, k)) for k in written.state_dicts[ROOT] if (k,) in expect}
    else:
        container = load_container(out, mmap=True)
        changed_paths = {(*_sd_path(ckpt, sd), k) for sd, k in changed}
        if isinstance(ckpt, TorchCheckpoint):  # an aliased state dict is walked under its first path only
            first: dict[int, Path_] = {}
            inputs = [p for p, _ in _walk(ckpt.container, first)]
            for sd, k in changed:
                node = _at_node(ckpt.container, ckpt.path_of(sd))
                if id(node) in first:
                    changed_paths.add((*first[id(node)], k))
        got = {p: d for p, d in _torch_digests(container).items() if p not in changed_paths}
        expect = {p: p for p in got}
        if isinstance(ckpt, TorchCheckpoint):
            expect |= {p: p for p in inputs if p not in changed_paths}
        else:
            expect |= {(k,): (k,) for k in ckpt.state_dicts[ROOT] if (ROOT, k) not in changed}
    if isinstance(ckpt, SafetensorsCheckpoint):
        src = {p: d for p, d in _safetensors_digests(ckpt.path, None).items() if p in set(expect.values())}
    elif isinstance(ckpt, TorchCheckpoint):  # by path, not by walking: an aliased dict is walked under one path only
        by_id: dict[int, _Digest] = {}
        src = {}
        for p in set(expect.values()):
            t = _at(ckpt.container, p)
            if t is not None:
                src[p] = by_id[id(t)] = by_id.get(id(t)) or _tensor_digest(t)
    else:  # any other reader (.npz): one flat state dict, read tensor by tensor
        src = {p: _tensor_digest(ckpt.tensor(ROOT, str(p[-1]))) for p in set(expect.values())}
    total = 0
    for out_path, in_path in expect.items():
        a, b = got.get(out_path), src.get(in_path)
        name = "/".join(str(p) for p in in_path)
        if a is None or b is None:
            where = "output" if a is None else "input"
            raise VitresizeError(f"verification failed: tensor {name!r} is missing from the {where} (a vitresize bug)")
        if a != b:
            raise VitresizeError(
                f"verification failed: tensor {name!r} differs from the input "
                f"({b.dtype} {list(b.shape)} -> {a.dtype} {list(a.shape)}); nothing was written (a vitresize bug)"
            )
        total += a.nbytes
    return Verification(tensors=len(expect), bytes=total)
