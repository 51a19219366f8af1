"""torch pickles (``.pth/.pt/.bin``): loaded with ``weights_only=True`` only, zip files memory-mapped.

The allow-list is ``argparse.Namespace`` (training checkpoints carry ``args``, as timm allows) and NumPy
scalars (``best_acc1 = np.float64(...)``): types whose unpickling builds plain data and runs no code.
Nothing else. A refused global is named in the error, and there is no unsafe fallback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from ..errors import CheckpointFormatError, UnsafeCheckpointError
from ..keymaps import TensorInfo
from ._dtypes import nbytes
from ._torch_zip import Locate
from ._zip_index import TensorRef, check_legacy, check_zip, data_offset, is_tensor_ref, read_zip_index
from .base import ROOT, Checkpoint, Segment, TensorPath, WriteJob, Writer, Written

if TYPE_CHECKING:
    import torch

    from ._copy import Progress

__all__ = [
    "TorchCheckpoint",
    "TorchWriter",
    "iter_state_dicts",
    "load_container",
    "replace_tensors",
    "save_container",
]

_MAX_DEPTH = 4  # levels of string-keyed dicts searched for state dicts
_MAX_NODES = 5_000_000  # objects a container may hold (a ViT-g training checkpoint: ~10k)
_MAX_NESTING = 100  # containers in containers (torch.save's pickler fails at ~450 here)


def _safe_globals() -> list[Any]:
    """``argparse.Namespace``, and NumPy's scalar constructor and ``dtype`` under both module names."""
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np
        from numpy._core.multiarray import scalar  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # pragma: no cover - NumPy < 2, or no NumPy: nothing of it to allow
        return allowed
    allowed += [np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar")]
    allowed += [type(np.dtype(c)) for c in "?bhilqBHILQefdgFDG"]  # numpy.dtypes.Float64DType, ...
    return allowed


def load_container(path: Path, *, mmap: bool) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with the allow-list and clear errors."""
    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()), _loadable(path, mmap) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about odd pickle protocols; the error says more
            return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap and not hasattr(f, "read"))
    except pickle.UnpicklingError as e:
        what = _blocked(str(e))
        if what is None:
            raise CheckpointFormatError(
                f"cannot read {path} as a torch checkpoint: {_first_line(str(e))} (truncated or corrupt?)"
            ) from None
        raise UnsafeCheckpointError(
            f"refused to load {path}: weights_only=True blocked it ({what}); vitresize never runs code from a "
            f"checkpoint: re-save its state_dict (torch.save or safetensors) where you trust the file"
        ) from None
    except MemoryError:
        raise CheckpointFormatError(
            f"cannot read {path} as a torch checkpoint: it declares more data than fits in memory (corrupt?)"
        ) from None
    except Exception as e:  # any failure inside torch.load on a file is a bad file
        reason = _first_line(str(e)) or type(e).__name__
        raise CheckpointFormatError(
            f"cannot read {path} as a torch checkpoint: {reason} (truncated or corrupt?)"
        ) from None


def _first_line(message: str) -> str:
    """The line of a torch error that says what went wrong, without its advice (at most 200 characters)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            line = line.removeprefix("WeightsUnpickler error:").strip()
            if line:
                return line[:200]
    meaningful = [
        ln for ln in lines if not ln.startswith(("Weights only load failed", "In PyTorch 2.6", "Please file"))
    ]
    line = (meaningful or lines or [""])[0]
    for noise in (". This is an internal miniz error", "  (Could this error message be improved?"):
        line = line.split(noise)[0]
    return line[:200]


@contextlib.contextmanager
def _loadable(path: Path, mmap: bool) -> Iterator[Any]:
    """What to give torch.load: the path, except for names ending ``.safetensors``, which torch.load hands
    to safetensors whatever the content; those go by ``/proc/self/fd`` (keeps mmap) or as a file object."""
    if not path.name.endswith(".safetensors"):
        yield path
    elif mmap and Path("/proc/self/fd").is_dir():
        fd = os.open(path, os.O_RDONLY)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
    else:
        with open(path, "rb") as f:
            yield f


def _blocked(message: str) -> str | None:
    """What weights_only refused to build (a global, a type), or ``None`` when the pickle is just broken."""
    for line in message.splitlines():
        if "can only build" in line.lower() and "but got" in line:
            return "unsupported type " + line.rsplit("but got", 1)[1].strip().rstrip(".")
        if "unsupported global" in line.lower() or "is blocked" in line:
            line = line.strip().removeprefix("WeightsUnpickler error:").strip()
            return re.split(r"\.\s", line, maxsplit=1)[0].rstrip(".")
    return None


def _is_torch_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _is_state_dict(node: Mapping[Any, Any], is_tensor: Callable[[Any], bool]) -> bool:
    has_tensor = False
    for k, v in node.items():
        if not isinstance(k, str) or isinstance(v, Mapping):
            return False
        has_tensor = has_tensor or is_tensor(v)
    return has_tensor


def iter_state_dicts(
    obj: Any, path: tuple[str, ...] = (), is_tensor: Callable[[Any], bool] = _is_torch_tensor
) -> Iterator[tuple[tuple[str, ...], MutableMapping[str, Any]]]:
    """Every model-like dict in a container (string keys, tensor values, no nested dicts), searched through
    string-keyed dicts up to ``_MAX_DEPTH`` levels down.

    Each dict is yielded once, under the first path that reaches it depth-first: a dict reachable by several
    paths (``{"model": sd, "model_ema": sd}``, which torch.save keeps shared) is one state dict, named
    ``model``; :func:`replace_tensors` converts it under every path. A dict is searched at most once per
    level it is reached at, so a crafted file of dicts sharing dicts (tiny, thanks to the pickle memo, but
    with billions of paths) takes time in proportion to its size.
    """
    verdicts: dict[int, bool] = {}  # id -> is a state dict
    searched: dict[int, int] = {}  # id -> the most levels left it was searched with
    keep: list[Any] = []  # what the ids above belong to, alive until the walk ends

    def walk(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], MutableMapping[str, Any]]]:
        if not isinstance(node, Mapping):
            return
        if id(node) not in verdicts:
            keep.append(node)
            verdicts[id(node)] = _is_state_dict(node, is_tensor)
            if verdicts[id(node)]:
                yield path, node  # type: ignore[misc]
        left = _MAX_DEPTH - len(path)
        if verdicts[id(node)] or left <= searched.get(id(node), 0):
            return
        searched[id(node)] = left
        for k, v in node.items():
            if isinstance(k, str) and isinstance(v, Mapping):
                yield from walk(v, (*path, k))

    yield from walk(obj, path)


def _values(x: Any) -> Iterable[Any]:
    """What a container holds: a dict's keys, values and attributes (``_metadata``), a list's, tuple's or set's
    items, a Namespace's attributes. Nothing for anything else (tensors, numbers, strings)."""
    if isinstance(x, Mapping):
        return itertools.chain(x.keys(), x.values(), getattr(x, "__dict__", {}).values())
    if isinstance(x, (list, tuple, set, frozenset)):
        return x
    if isinstance(x, argparse.Namespace):
        return vars(x).values()
    return ()


def _is_container(x: Any) -> bool:
    return isinstance(x, (Mapping, list, tuple, set, frozenset, argparse.Namespace))


def _survey(root: Any, path: Path) -> None:
    """Refuse a container that no walk should go through: over ``_MAX_NODES`` objects, or containers nested over
    ``_MAX_NESTING`` deep (torch.save of it fails with RecursionError). Each object is walked once, by id, so a
    crafted file of shared dicts takes time in proportion to its size; the walk keeps no Python recursion.

    Raises:
        CheckpointFormatError: one line.
    """
    deep = CheckpointFormatError(
        f"{path}: its container nests containers over {_MAX_NESTING} levels deep, more than torch.save can "
        f"write back (a crafted file?); load it where you trust it and save the state dict alone with torch.save"
    )
    if not _is_container(root):
        return
    height: dict[int, int] = {}  # id -> levels of containers from it down, through its deepest path
    active = {id(root)}  # the containers on the walk's path: reaching one again is a cycle, not deeper
    stack: list[tuple[Any, Iterator[Any], list[int]]] = [(root, iter(_values(root)), [0])]
    seen = 0
    while stack:
        node, values, below = stack[-1]
        for child in values:
            seen += 1
            if seen > _MAX_NODES:
                raise CheckpointFormatError(
                    f"{path}: its container holds over {_MAX_NODES:,} objects, more than a checkpoint does (a "
                    f"crafted file?); load it where you trust it and save the state dict alone with torch.save"
                )
            if not _is_container(child) or id(child) in active:
                continue
            if id(child) in height:
                below[0] = max(below[0], height[id(child)])
                continue
            if len(stack) >= _MAX_NESTING:
                raise deep
            active.add(id(child))
            stack.append((child, iter(_values(child)), [0]))
            break
        else:
            stack.pop()
            active.discard(id(node))
            height[id(node)] = below[0] + 1
            if height[id(node)] > _MAX_NESTING:
                raise deep
            if stack:
                stack[-1][2][0] = max(stack[-1][2][0], height[id(node)])


def replace_tensors(container: Any, replacements: Mapping[str | tuple[str, ...], Mapping[str, Any]]) -> Any:
    """``container`` with the tensors of ``replacements`` put in, for :func:`save_container`; the input and
    everything in it are left as they are.

    ``replacements`` maps a state dict (its name in ``TorchCheckpoint.state_dicts``: ``"model"``,
    ``"a/b"``, ``""`` for the container itself, or its path of keys as a tuple, for keys holding ``/``) to
    ``{key: new tensor}``. A state dict is one object however many paths lead to it (torch.save keeps the
    sharing of ``{"model": sd, "model_ema": sd}``, and ``state_dicts`` names it once), and it is converted as
    one: every path to it, through dicts, lists, tuples and Namespaces, leads to the same new dict. Only the
    containers on the way to a changed state dict are copied (shallow, keeping their type and attributes),
    each once, so what was shared stays shared; everything else is the input's own objects.

    Example:
        >>> new = replace_tensors(ckpt.container, {"model": {"pos_embed": resized}})
        >>> save_container(new, dst)

    Raises:
        KeyError: a name or path that leads nowhere in ``container``.
        ValueError: one that leads to something else than a dict.
    """
    targets: dict[int, dict[str, Any]] = {}
    for name, tensors in replacements.items():
        node = container
        for part in name if isinstance(name, tuple) else name.split("/") if name else ():
            node = node[part]
        if not isinstance(node, MutableMapping):
            raise ValueError(f"{name!r} is not a dict of the container")
        targets.setdefault(id(node), {}).update(tensors)
    # Who holds whom, over the whole container, each object once: an alias may be anywhere in it.
    nodes: dict[int, Any] = {id(container): container}
    holders: dict[int, list[int]] = {}
    todo = [container]
    while todo:
        node = todo.pop()
        for child in _values(node):
            if _is_container(child):
                holders.setdefault(id(child), []).append(id(node))
                if id(child) not in nodes:
                    nodes[id(child)] = child
                    todo.append(child)
    dirty, ids = set(targets), list(targets)  # a changed state dict and everything that holds one
    while ids:
        for holder in holders.get(ids.pop(), ()):
            if holder not in dirty:
                dirty.add(holder)
                ids.append(holder)
    new = {i: copy.copy(nodes[i]) for i in dirty if not isinstance(nodes[i], tuple)}
    for i in dirty:  # tuples, inner ones first (they cannot hold themselves but through a list or dict)
        stack = [nodes[i]] if isinstance(nodes[i], tuple) else []
        while stack:
            t = stack[-1]
            inner = [c for c in t if isinstance(c, tuple) and id(c) in dirty and id(c) not in new]
            if inner:
                stack.extend(inner)
                continue
            stack.pop()
            if id(t) not in new:
                items = [new.get(id(c), c) for c in t]
                new[id(t)] = tuple(items) if type(t) is tuple else type(t)(items)
    for i in dirty:
        node, out = nodes[i], new[i]
        if isinstance(node, Mapping):
            for k, v in node.items():
                if id(v) in dirty:
                    out[k] = new[id(v)]
        elif isinstance(node, list):
            for j, v in enumerate(node):
                if id(v) in dirty:
                    out[j] = new[id(v)]
        for attr, v in (getattr(node, "__dict__", None) or {}).items():  # Namespaces, dict attributes
            if id(v) in dirty:
                setattr(out, attr, new[id(v)])
    for i, tensors in targets.items():
        new[i].update(tensors)
    return new.get(id(container), container)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _infos(sd: Mapping[str, Any], is_tensor: Callable[[Any], bool]) -> dict[str, TensorInfo]:
    """Shapes and dtypes of the tensors of a state dict (torch tensors, or the index's :class:`TensorRef`)."""
    return {
        k: TensorInfo(tuple(v.shape), v.dtype if isinstance(v, TensorRef) else _dtype_name(v))
        for k, v in sd.items()
        if is_tensor(v)
    }


class TorchCheckpoint(Checkpoint):
    """A torch pickle. Zip files are indexed without torch (:mod:`._zip_index`) and memory-mapped by
    ``torch.load`` only when tensor data is needed; legacy pickles (and zip files the index does not model)
    load with ``torch.load`` up front, after :func:`check_zip` / :func:`check_legacy` refused what torch.load
    must not be handed. A zip file whose storage sizes those checks cannot tell loads without ``mmap``.

    A state dict reachable by several paths is named by the first (see :func:`iter_state_dicts`); a .pth
    written with :func:`replace_tensors` converts it under all of them.
    """

    writer: ClassVar[str] = "torch"

    @classmethod
    def zip(cls, path: Path) -> TorchCheckpoint:
        """A zip checkpoint (``torch.save``'s format since torch 1.6)."""
        return cls(path, zip_format=True)

    @classmethod
    def legacy(cls, path: Path) -> TorchCheckpoint:
        """A legacy (non-zip) pickle, loaded whole."""
        return cls(path, zip_format=False)

    def __init__(self, path: Path, *, zip_format: bool) -> None:
        self.path = path
        self.format = "torch-zip" if zip_format else "torch-legacy"
        self.metadata = {}
        self._index = read_zip_index(path) if zip_format else None
        self._container: Any = None
        mmap = zip_format
        if self._index is None:
            if zip_format:
                mmap = check_zip(path)
            else:
                check_legacy(path)
            self._container = load_container(path, mmap=mmap)
        self.lazy = mmap
        source, is_tensor = self._outline()
        _survey(source, path)
        self._paths: dict[str, tuple[str, ...]] = {}
        self.state_dicts = {}
        for p, sd in iter_state_dicts(source, is_tensor=is_tensor):
            name = "/".join(p) if p else ROOT
            self._paths[name] = p
            self.state_dicts[name] = _infos(sd, is_tensor)
        self.extras = self._extras(source)
        self._ranges: dict[int, tuple[int, int]] | None = None
        self._first: dict[int, TensorPath] = {}  # container id -> the path tensors() walks it under

    def _outline(self) -> tuple[Any, Callable[[Any], bool]]:
        """The container as read for planning (the index if there is one) and how to tell its tensors."""
        if self._index is not None:
            return self._index.container, is_tensor_ref
        return self._container, _is_torch_tensor

    def _extras(self, source: Any) -> list[str]:
        if not isinstance(source, Mapping) or ROOT in self._paths:
            return []
        tops = {name.split("/")[0] for name in self._paths}
        return [str(k) for k in source if str(k) not in tops]

    @property
    def container(self) -> Any:
        """What ``torch.load(weights_only=True)`` returns (tensors memory-mapped for zip files), loaded on first
        use and checked against the index that planned the conversion."""
        if self._container is None:
            self._container = load_container(self.path, mmap=True)
            got = {"/".join(p): _infos(sd, _is_torch_tensor) for p, sd in iter_state_dicts(self._container)}
            if got != self.state_dicts:
                raise CheckpointFormatError(
                    f"{self.path}: torch.load reads other tensors than the zip index did (corrupt file?)"
                )
        return self._container

    def top_keys(self) -> list[str]:
        source, _ = self._outline()
        return [str(k) for k in source] if isinstance(source, Mapping) else []

    def path_of(self, state_dict: str) -> tuple[str, ...]:
        """The keys that lead to a state dict in the container (its name joins them with ``/``, which a key may
        hold, so the name alone cannot be split back)."""
        return self._paths[state_dict]

    def _node(self, root: Any, state_dict: str) -> Any:
        """The state dict ``state_dict`` inside a container (the index's or torch's: same nesting)."""
        for part in self._paths[state_dict]:
            root = root[part]
        return root

    def non_tensors(self, state_dict: str) -> list[str]:
        source, is_tensor = self._outline()
        return [k for k, v in self._node(source, state_dict).items() if not is_tensor(v)]

    def raw_state_dict(self, name: str) -> MutableMapping[str, Any]:
        """The loaded dict itself (tensors mmap-backed for zip files); changes to it go into :func:`save_container`."""
        sd: MutableMapping[str, Any] = self._node(self.container, name)
        return sd

    def tensor(self, state_dict: str, key: str) -> torch.Tensor:
        t: torch.Tensor = self.raw_state_dict(state_dict)[key]
        return t

    def count_nonfinite(self, state_dict: str, key: str) -> int:
        """From the raw bytes where the index has them (``inspect`` of a zip file never imports torch)."""
        raw = self.raw_bytes(state_dict, key)
        if raw is None:
            return super().count_nonfinite(state_dict, key)
        from ._dtypes import TORCH_TO_ST, count_nonfinite

        return count_nonfinite(raw, TORCH_TO_ST.get(self.state_dicts[state_dict][key].dtype, ""))

    def raw_bytes(self, state_dict: str, key: str) -> bytes | None:
        """The bytes of a contiguous tensor of a stored zip member, read by offset (the index knows where)."""
        ref = self._ref(state_dict, key)
        rng = self._index.file_range(ref) if self._index is not None and ref is not None else None
        if rng is None:
            return None
        with open(self.path, "rb") as f:
            f.seek(rng[0])
            raw = f.read(rng[1])
        if len(raw) != rng[1]:
            raise CheckpointFormatError(f"{self.path}: tensor {key!r} is cut short (truncated file?)")
        return raw

    def _ref(self, state_dict: str, key: str) -> TensorRef | None:
        if self._index is None:
            return None
        ref = self._node(self._index.container, state_dict)[key]
        return ref if isinstance(ref, TensorRef) else None

    def file_ranges(self, state_dict: str) -> dict[str, tuple[int, int]]:
        """``key -> (file offset, length)`` of the tensors whose bytes lie as they are in the file.

        A zip checkpoint holds each storage as a stored (uncompressed) member; a contiguous tensor's bytes are
        a range of it, copied file to file (``copy_file_range``) without mapping them into this process.
        From the index; else (a zip file torch had to load) from the mapped storages' addresses: torch maps
        the whole file once, so a storage's address minus the mapping's base is its member's file offset.
        Empty for legacy pickles, compressed members, or anything that does not add up.
        """
        if state_dict not in self._paths:
            return {}
        if self._index is not None:
            out = {}
            for key in self.state_dicts[state_dict]:
                ref = self._ref(state_dict, key)
                rng = self._index.file_range(ref) if ref is not None else None
                if rng is not None:
                    out[key] = rng
            return out
        if self._ranges is None:
            self._ranges = _file_ranges(self.path, self._container) if self.lazy else {}
        sd = self.raw_state_dict(state_dict)
        return {k: self._ranges[id(v)] for k, v in sd.items() if id(v) in self._ranges}

    def segments(self, state_dict: str) -> list[Segment]:
        """The tensors of a state dict, each with its byte range where its bytes lie as they are in the file."""
        ranges = self.file_ranges(state_dict)
        out = []
        for key, info in self.state_dicts[state_dict].items():
            rng = ranges.get(key)
            source = (self.path, rng[0]) if rng is not None else None
            size = nbytes(info.shape, info.dtype)
            out.append(Segment(key, info.dtype, info.shape, size, self._loader(self.path_of(state_dict), key), source))
        return out

    def _loader(self, path: TensorPath, key: Any) -> Any:
        return lambda: _at(self.container, (*path, key))

    def tensors(self) -> dict[TensorPath, Segment]:
        """Every tensor of the container (optimizer moments too), under the first path that reaches it: each
        container is walked once (a dict shared by two keys, or a crafted file of shared nested dicts, is not
        walked once per path), and a tensor met under several paths is one segment."""
        source, is_tensor = self._outline()
        by_id: dict[int, Segment] = {}
        out: dict[TensorPath, Segment] = {}
        for path, node in _walk(source, is_tensor, self._first):
            seg = by_id.get(id(node))
            if seg is None:
                seg = by_id[id(node)] = self._segment(path, node)
            out[path] = seg
        return out

    def _segment(self, path: TensorPath, node: Any) -> Segment:
        if isinstance(node, TensorRef):
            dtype, shape = node.dtype, tuple(node.shape)
            rng = self._index.file_range(node) if self._index is not None else None
        else:
            dtype, shape = _dtype_name(node), tuple(node.shape)
            if self._ranges is None:
                self._ranges = _file_ranges(self.path, self._container) if self.lazy else {}
            rng = self._ranges.get(id(node))
        source = (self.path, rng[0]) if rng is not None else None
        return Segment(str(path[-1]), dtype, shape, nbytes(shape, dtype), self._loader(path[:-1], path[-1]), source)

    def tensor_path(self, state_dict: str, key: str) -> TensorPath:
        """Under the path :meth:`tensors` walks the state dict by (the first that reaches it)."""
        if not self._first:
            self.tensors()
        source, _ = self._outline()
        node = self._node(source, state_dict)
        return (*self._first.get(id(node), self.path_of(state_dict)), key)

    def replaced(self, replacements: Mapping[str, Mapping[str, Any]]) -> Any:
        """The loaded container with the replacements put in (:func:`replace_tensors`): a state dict reached by
        several paths is replaced under all of them, and stays one object."""
        return replace_tensors(self.container, {self.path_of(sd): ts for sd, ts in replacements.items()})

    def left_out(self, state_dict: str) -> list[str]:
        """The container's other top-level entries and state dicts, and the state dict's non-tensor entries."""
        left: list[str] = []
        if state_dict != ROOT:
            root = self.path_of(state_dict)[0]
            left += [t for t in self.top_keys() if t != root]
            left += [s for s in self.state_dicts if s != state_dict and self.path_of(s)[0] == root]
        left += [f"{k} (not a tensor)" for k in self.non_tensors(state_dict)]
        return left

    def _release(self) -> None:
        self._paths = {}
        self._ranges = None
        self._container = None
        self._index = None
        self._first = {}


class TorchWriter(Writer):
    """``.pth``: the whole container (every state dict, nesting and non-tensor entries) in ``torch.save``'s format,
    the storages that lie as they are in the input copied file to file (:mod:`._torch_zip`)."""

    format: ClassVar[str] = "torch"
    suffixes: ClassVar[tuple[str, ...]] = (".pth", ".pt", ".bin", ".ckpt")
    whole_container: ClassVar[bool] = True

    def write(self, out: Path, job: WriteJob, progress: Progress | None) -> Written:
        by_sd: dict[str, dict[str, Any]] = {}
        for (sd, key), r in job.replacements.items():
            by_sd.setdefault(sd, {})[key] = r.load()
        ckpt = job.checkpoint
        save_container(ckpt.replaced(by_sd), out, progress, sources=ckpt.source_files())
        return Written(out.stat().st_size)


def mapped_storages(files: tuple[Path, ...]) -> Locate:
    """Where a storage memory-mapped from one of ``files`` lies in it (``torch.load(mmap=True)`` of a zip
    checkpoint, safetensors' mapping), found by the address ranges of this process's mappings of the files;
    for a zip member, with the CRC-32 its central directory gives. Left out (their storages are written from
    memory): a mapping with a page written in this process (a tensor changed in place), and a zip file whose
    storages torch byte-swaps or that holds compressed ones: their mapped bytes are not the tensors'."""
    from ._pages import unwritten_mappings

    usable: list[Path] = []
    members: dict[Path, dict[int, tuple[int, int]]] = {}
    for path in files:
        if zipfile.is_zipfile(path):
            try:
                table = _member_table(path)
            except Exception:  # zipfile raises many kinds on a crafted file: write its storages instead
                table = None
            if table is None:
                continue
            members[path] = table
        usable.append(path)
    mapped = unwritten_mappings(usable)
    ranges = [(start, end, offset, path) for path in usable for start, end, offset in mapped[path]]

    def locate(address: int, nbytes: int) -> tuple[Path, int, int | None] | None:
        for start, end, offset, path in ranges:
            if start <= address and address + nbytes <= end:
                at = offset + address - start
                member = members.get(path, {}).get(at)
                return path, at, member[1] if member is not None and member[0] == nbytes else None
        return None

    return locate


def _walk(obj: Any, is_tensor: Callable[[Any], bool], first: dict[int, TensorPath]) -> Iterator[tuple[TensorPath, Any]]:
    """Every tensor in a container of dicts, lists and tuples, with its path. Each container is walked once, under
    the first path that reaches it depth-first (as :func:`iter_state_dicts` names state dicts), which ``first``
    records by the container's id."""
    seen: set[int] = set()
    stack: list[tuple[TensorPath, Any]] = [((), obj)]
    while stack:
        path, node = stack.pop()
        if is_tensor(node):
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
        first[id(node)] = path
        stack.extend(((*path, k), v) for k, v in reversed(items))


def _at(obj: Any, path: TensorPath) -> Any:
    """What lies at ``path`` in a container of dicts, lists and tuples."""
    for part in path:
        obj = obj[part]
    return obj


def _member_table(path: Path) -> dict[int, tuple[int, int]] | None:
    """File offset -> (size, CRC-32) of the data of every ``*/data/*`` member; None if any is compressed, or if
    the file is not little-endian (torch swaps the bytes of what it maps: the file's bytes are not the tensors')."""
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        infos = [i for i in z.infolist() if "/data/" in i.filename]
        if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
            return None
        for i in z.infolist():
            if i.filename.lower().endswith("/byteorder") and (i.file_size != len(b"little") or z.read(i) != b"little"):
                return None
        try:
            return {data_offset(f, i): (i.file_size, i.CRC) for i in infos}
        except ValueError:
            return None


def _file_ranges(path: Path, container: Any) -> dict[int, tuple[int, int]]:
    """``id(tensor) -> (file offset, length)`` for the contiguous tensors of a memory-mapped zip checkpoint whose
    storages :func:`mapped_storages` finds in the file (not byte-swapped, stored, no page written in memory)."""
    import torch

    locate = mapped_storages((path,))
    out = {}
    for _, sd in iter_state_dicts(container):
        for t in sd.values():
            if not isinstance(t, torch.Tensor) or not t.is_contiguous():
                continue
            nbytes, storage = t.numel() * t.element_size(), t.untyped_storage()
            found = locate(storage.data_ptr(), storage.nbytes()) if nbytes and storage.nbytes() else None
            if found is not None:
                out[id(t)] = (int(found[1] + t.storage_offset() * t.element_size()), int(nbytes))
    return out


_RELEASE_EVERY = 256 * 1024 * 1024


class _Sink:
    """The file torch.save writes to. It remembers the OS error of a failed write (torch.save reports a full
    disk only as ``RuntimeError: unexpected pos``), reports progress, and every 256 MiB gives back the pages
    of the memory-mapped inputs that torch.save has read (``sources``), so peak RSS does not grow with them.
    """

    def __init__(self, f: BinaryIO, sources: tuple[Path, ...], progress: Callable[[int], None] | None) -> None:
        self.f = f
        self.sources = sources
        self.progress = progress
        self.error: OSError | None = None
        self._since_release = 0

    def write(self, data: bytes) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self._since_release += n
        if self._since_release >= _RELEASE_EVERY:
            self.release()
        if self.progress:
            self.progress(n)
        return n

    def release(self) -> None:
        from ._pages import release

        self._since_release = 0
        for p in self.sources:
            release(p)

    def flush(self) -> None:
        self.f.flush()


def save_container(
    obj: Any, dst: Path, progress: Callable[[int], None] | None = None, sources: tuple[Path, ...] = ()
) -> None:
    """Save ``obj`` in ``torch.save``'s zip format: through :func:`._torch_zip.save_zip` (storages memory-mapped
    from ``sources`` copied file to file, block-congruent), else with ``torch.save`` through :class:`_Sink`.

    Raises:
        OSError: the write failed (disk full, I/O error), with its errno.
    """
    import torch

    from ._torch_zip import save_zip

    if save_zip(obj, dst, mapped_storages(sources), progress):
        return
    # Opened without truncation (O_TRUNC): see write_safetensors; DST is a fresh temp file.
    with os.fdopen(os.open(dst, os.O_WRONLY | os.O_CREAT, 0o666), "wb") as f:
        if os.fstat(f.fileno()).st_size:
            f.truncate(0)
        sink = _Sink(f, sources, progress)
        try:
            torch.save(obj, sink)  # type: ignore[arg-type]
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise
        sink.release()
