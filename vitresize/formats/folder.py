"""Model folders: shards with their index (``model.safetensors.index.json`` or
``pytorch_model.bin.index.json``, as Hugging Face writes them), or one weights file (``model.safetensors``,
``pytorch_model.bin``), beside a ``config.json``.

Read: the index maps every key to its shard; each shard is opened header-first, so a folder of any size
is planned from its headers. Write: a folder out, built in a temp folder beside DST and renamed into place;
only the shards that hold a changed tensor are rewritten (streamed like a single file), every other file
is copied as it is, and the index gets the new total size.

A folder from the internet is not trusted: :func:`scan_folder` lists its regular files, subfolders included
(walked with an explicit stack, at most :data:`MAX_FOLDER_DEPTH` levels deep), and refuses a FIFO, a socket or
a device anywhere in it, and any link that leads out of it (or to nothing, or to a folder). A link that stays
inside is read (and copied) as the file it points to. Links may leave the folder for the Hugging Face hub cache
only:

- in a hub cache snapshot (``models--ORG--NAME/snapshots/REV/``, whose files are links to ``../../blobs/SHA``),
  links into that repository's own ``blobs/`` folder;
- anywhere, a link whose fully resolved target is a regular file directly inside a ``blobs/`` folder of a
  ``models--*`` folder (``.../models--ORG--NAME/blobs/SHA``), as older ``huggingface_hub`` releases leave in a
  ``snapshot_download(local_dir=..., local_dir_use_symlinks=True)`` folder, and as users link by hand.
  Only model repositories' blobs (not ``datasets--*`` or ``spaces--*``).

Such a link is read, and copied, as a regular file with the blob's permission bits, never wider.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import CheckpointFormatError
from ..keymaps import TensorInfo
from . import _copy
from ._dtypes import nbytes
from ._files import describe_kind, open_regular, read_json
from .atomic import atomic_folder, check_folder_destination, check_not_holding, permissions
from .base import ROOT, Checkpoint, Segment, WriteJob, Writer, Written

if TYPE_CHECKING:
    import torch

    from ._copy import Progress

__all__ = [
    "MAX_FOLDER_DEPTH",
    "FolderScan",
    "FolderWriter",
    "ShardedCheckpoint",
    "copy_regular",
    "find_index",
    "scan",
    "scan_folder",
]

INDEX_SUFFIX = ".safetensors.index.json"
INDEX_SUFFIXES = (INDEX_SUFFIX, ".bin.index.json")  # safetensors shards; torch shards (pytorch_model-*.bin)
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
MAX_FOLDER_DEPTH = 64
"""A model folder's subfolders may nest this many levels deep (``a/b/.../z``, 64 names); a deeper one is refused
(hub repositories nest a few levels at most)."""


def _link_roots(folder: Path) -> tuple[Path, ...]:
    """Where links in a model folder may lead: inside it, and for a hub cache snapshot, its ``blobs/``."""
    real = folder.resolve()
    for p in (real, *real.parents):
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
            return real, p.parent.parent / "blobs"
    return (real,)


def _is_hub_blob(real: Path) -> bool:
    """Whether a fully resolved path names a file directly in a hub cache model repository's ``blobs/``."""
    return real.parent.name == "blobs" and real.parent.parent.name.startswith("models--")


@dataclass
class FolderScan:
    """What :func:`scan_folder` found in a model folder."""

    files: dict[str, Path] = field(default_factory=dict)
    """Every regular file by relative path (``sub/name``), with the real path to read (a link resolved)."""
    sizes: dict[str, int] = field(default_factory=dict)
    """The bytes of each file, by the same relative path (a link: its target's)."""
    folders: dict[str, int] = field(default_factory=dict)
    """Every subfolder by relative path (parents first), with its ``st_mode``."""

    @property
    def size_bytes(self) -> int:
        """The bytes of all files of the folder."""
        return sum(self.sizes.values())


def _entries(path: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise CheckpointFormatError(f"cannot read the folder {path}: {e.strerror or e}") from None
    return iter(entries)


def scan(folder: Path) -> FolderScan:
    """The regular files of a model folder, subfolders included, and its subfolders; see :func:`scan_folder`.

    Raises:
        CheckpointFormatError: a FIFO, socket or device anywhere in the folder, a link that leads out of it
            (other than to a hub cache blob), to nothing, or to a folder; subfolders nested deeper than
            :data:`MAX_FOLDER_DEPTH`.
    """
    roots = _link_roots(folder)
    found = FolderScan()
    fix = "remove it or replace it with the file"
    # Depth first, each folder's entries sorted, as a recursive walk would go (parents before their files),
    # but with an explicit stack: a folder nested thousands deep is one error line, not a RecursionError.
    stack: list[tuple[str, Iterator[os.DirEntry[str]]]] = [("", _entries(folder))]
    while stack:
        rel, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        item, name = Path(entry.path), rel + entry.name
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as e:
            raise CheckpointFormatError(f"cannot read {item}: {e.strerror or e}") from None
        if stat.S_ISLNK(st.st_mode):
            real = Path(os.path.realpath(item))
            if not any(root in real.parents for root in roots) and not _is_hub_blob(real):
                raise CheckpointFormatError(f"{item} is a link to {real}, outside the model folder {folder}; {fix}")
            try:
                st = real.stat()
            except OSError:
                raise CheckpointFormatError(f"{item} is a link to {real}, which does not exist; {fix}") from None
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointFormatError(f"{item} is a link to {describe_kind(st.st_mode)}; {fix}")
            found.files[name], found.sizes[name] = real, st.st_size
        elif stat.S_ISDIR(st.st_mode):
            if len(stack) > MAX_FOLDER_DEPTH:  # len(stack) is this subfolder's depth
                top = name.split("/", 1)[0]
                raise CheckpointFormatError(
                    f"{folder / top} holds folders nested more than {MAX_FOLDER_DEPTH} levels deep, which no model "
                    f"folder does; remove it (or convert the weights file on its own)"
                )
            found.folders[name] = st.st_mode
            stack.append((name + "/", _entries(item)))
        elif stat.S_ISREG(st.st_mode):
            found.files[name], found.sizes[name] = item, st.st_size
        else:
            raise CheckpointFormatError(
                f"{item} is {describe_kind(st.st_mode)}, not a file a model folder holds; remove it"
            )
    return found


def scan_folder(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The regular files of a model folder by relative path (``sub/name``), each with the real path to read,
    and its subfolders (parents first).

    Raises:
        CheckpointFormatError: a FIFO, socket or device anywhere in the folder, a link that leads out of it
            (other than to a hub cache blob), to nothing, or to a folder; subfolders nested deeper than
            :data:`MAX_FOLDER_DEPTH`.
    """
    found = scan(folder)
    return found.files, list(found.folders)


def copy_regular(src: Path, dst: Path, *, mode: int) -> int:
    """Copy a regular file (a link in its last component refused: pass the resolved path) to a new ``dst``
    with permission bits ``mode``; returns the bytes copied.

    Raises:
        CheckpointFormatError: ``src`` is not a regular file (any more), or cannot be read.
        OSError: ``dst`` cannot be written.
    """
    with open_regular(src, follow=False) as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            done = os.fstat(fin.fileno()).st_size
            os.ftruncate(fd, done)  # sized first: holes of a sparse file stay holes
            # copy_file_range (a copy-on-write file system clones the whole file), else through a buffer
            _copy.copy_range(fin.fileno(), fd, 0, done, 0)
        finally:
            os.close(fd)
    dst.chmod(mode)
    return done


def find_index(folder: Path) -> Path | None:
    """The index of a sharded folder (``None`` if it has none); with both kinds, the safetensors one."""
    found = sorted(p for suffix in INDEX_SUFFIXES for p in folder.glob(f"*{suffix}"))
    if len(found) > 1 and any(p.name.endswith(INDEX_SUFFIX) for p in found):
        found = [p for p in found if p.name.endswith(INDEX_SUFFIX)]  # both kinds: the safetensors shards
    if len(found) > 1:
        raise CheckpointFormatError(
            f"{folder} holds {len(found)} *{INDEX_SUFFIX} files; pass the checkpoint file inside it, "
            f"or a folder of safetensors shards with one index"
        )
    return found[0] if found else None


def _single_weights(folder: Path) -> tuple[Path, list[Path]]:
    """The weights file of a folder without index, and the other copies of the weights beside it (a hub
    folder often holds both ``model.safetensors`` and ``pytorch_model.bin``; the safetensors one is used)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHTS_SUFFIXES)
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    if len(safetensors) == 1:
        return safetensors[0], [p for p in files if p != safetensors[0]]
    if not safetensors and len(files) == 1:
        return files[0], []
    what = "no weights file" if not files else f"{len(files)} weights files and no *{INDEX_SUFFIX}"
    raise CheckpointFormatError(
        f"{folder} is a folder with {what}; pass the checkpoint file inside it, or a model folder "
        f"(one weights file, or safetensors shards with their index)"
    )


class ShardedCheckpoint(Checkpoint):
    """A model folder: safetensors shards read through their index, or one weights file; one flat state
    dict across the files, each opened with ``open_file`` (the format registry's)."""

    writer: ClassVar[str] = "folder"

    def __init__(self, folder: Path, *, open_file: Callable[[Path], Checkpoint]) -> None:
        self.path = folder
        self.lazy = True
        self.scan = scan(folder)
        """What the folder holds: its files (with their sizes) and subfolders (with their modes)."""
        self.files = self.scan.files
        """Every regular file of the folder by relative path, with the real path to read."""
        self.folders = list(self.scan.folders)
        """Its subfolders by relative path, parents first."""
        self.index_path = find_index(folder)
        self.index: dict[str, Any] = {}
        self.duplicates: list[str] = []  # other weights files, left out of a folder output
        self.shards: dict[str, Checkpoint] = {}
        try:
            infos = self._open_shards(open_file)
        except BaseException:
            self._release()  # the shards opened so far
            raise
        self.state_dicts = {ROOT: infos}
        self.metadata = {}
        self.extras = []

    def _open_shards(self, open_file: Callable[[Path], Checkpoint]) -> dict[str, TensorInfo]:
        """Open the weights files (read through the index, or the single one) and check them against each other."""
        folder = self.path
        if self.index_path is None:
            self.format = "folder"
            weights, others = _single_weights(folder)
            self.duplicates = [p.name for p in others]
            shard = open_file(weights)
            self.shards[weights.name] = shard
            if list(shard.state_dicts) != [ROOT]:
                shard.close()
                raise CheckpointFormatError(
                    f"{weights} is a training container, not a flat state dict; pass the file itself "
                    f"(a model folder holds the model's weights only)"
                )
            weight_map = dict.fromkeys(shard.state_dicts[ROOT], weights.name)
        else:
            self.format = "safetensors-sharded" if self.index_path.name.endswith(INDEX_SUFFIX) else "torch-sharded"
            weight_map = self._read_index(self.index_path)
            for name in dict.fromkeys(weight_map.values()):
                file = folder / name
                if Path(name).name != name or not file.is_file():
                    raise CheckpointFormatError(
                        f"{self.index_path} names shard {name!r}, which is not a file in {folder}"
                    )
                self.shards[name] = open_file(file)
                if list(self.shards[name].state_dicts) not in ([ROOT], []):
                    raise CheckpointFormatError(f"{file} is not a flat state dict, as a shard must be")
        self.shard_of: dict[str, str] = {}
        infos: dict[str, TensorInfo] = {}
        for name, shard in self.shards.items():
            for key, info in shard.state_dicts.get(ROOT, {}).items():
                if weight_map.get(key) != name:
                    raise CheckpointFormatError(
                        f"{shard.path} holds {key!r}, which the index puts in {weight_map.get(key)!r}"
                    )
                self.shard_of[key] = name
                infos[key] = info
        missing = sorted(set(weight_map) - set(infos))
        if missing:
            raise CheckpointFormatError(f"{self.index_path} lists {missing[0]!r}, which no shard holds")
        return infos

    @property
    def size_bytes(self) -> int:
        """The bytes of all files of the folder (a link counted as its target), as scanned."""
        return self.scan.size_bytes

    def _read_index(self, path: Path) -> dict[str, str]:
        try:
            index = read_json(path, "shard index")
        except ValueError:
            index = None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointFormatError(
                f"{path} is not a valid index (no weight_map of key -> file name); re-download or re-save it"
            )
        if not isinstance(index.get("metadata", {}), dict | None):
            raise CheckpointFormatError(
                f"{path} is not a valid index: its metadata is not an object; fix it or re-download the index"
            )
        self.index = index
        return weight_map

    def tensor(self, state_dict: str, key: str) -> torch.Tensor:
        return self.shards[self.shard_of[key]].tensor(ROOT, key)

    def count_nonfinite(self, state_dict: str, key: str) -> int:
        return self.shards[self.shard_of[key]].count_nonfinite(ROOT, key)

    def raw_bytes(self, state_dict: str, key: str) -> bytes | None:
        return self.shards[self.shard_of[key]].raw_bytes(ROOT, key)

    def segments(self, state_dict: str) -> list[Segment]:
        """The tensors of every file, file by file, each as its file's reader hands it out."""
        return [seg for shard in self.shards.values() for seg in shard.segments(ROOT)]

    def source_files(self) -> tuple[Path, ...]:
        return tuple(self.files.values())

    def left_out(self, state_dict: str) -> list[str]:
        first = next(iter(self.shards))
        return [f"{name} (another copy of the weights; only {first} was converted)" for name in self.duplicates]

    def _release(self) -> None:
        for shard in self.shards.values():
            shard.close()


class FolderWriter(Writer):
    """A model folder: only the files holding a changed tensor are rewritten, each by the writer of its own
    format, and ``config.json`` gets the new geometry; the index gets the new total size; the rest is copied.

    What is copied is what :func:`scan` let through: regular files (a link inside the folder comes out as a copy
    of its file, a link to a hub cache blob too), in the folder and its subfolders. Every file and folder of the
    output keeps its source's permission bits, never wider (``& ~umask``): a file's as it is written, the
    folders' last (:func:`~.atomic.atomic_folder` applies them after the files are written and flushed, so a
    read-only folder never stands in the way of writing or cleaning up).
    """

    format: ClassVar[str] = "folder"

    def __init__(self, writers: Mapping[str, Writer]) -> None:
        self.writers = writers
        """The writers of the files, by format (:attr:`Checkpoint.writer`)."""

    def writes_raw(self, ckpt: Checkpoint) -> bool:
        assert isinstance(ckpt, ShardedCheckpoint)
        return all(self.writers[s.writer].writes_raw(s) for s in ckpt.shards.values())

    def check_destination(self, ckpt: Checkpoint, dst: Path, *, force: bool) -> None:
        """Also refuse a DST that is, or holds, a folder the input links into (a hub cache's ``blobs/``)."""
        assert isinstance(ckpt, ShardedCheckpoint)
        src = ckpt.path.resolve()
        for folder in dict.fromkeys(real.parent for real in ckpt.files.values() if src not in real.resolve().parents):
            check_not_holding(folder, dst, f"holds files that {ckpt.path} links to")
        suffixes = tuple(s for w in self.writers.values() for s in w.suffixes)
        check_folder_destination(dst, force=force, file_suffixes=suffixes)

    @contextlib.contextmanager
    def atomic(self, ckpt: Checkpoint, dst: Path, *, force: bool, fsync: bool) -> Iterator[Path]:
        assert isinstance(ckpt, ShardedCheckpoint)
        mode, folder_modes = ckpt.path.stat().st_mode, ckpt.scan.folders
        with atomic_folder(dst, force=force, fsync=fsync, mode=mode, folder_modes=folder_modes) as tmp:
            yield tmp

    def write(self, out: Path, job: WriteJob, progress: Progress | None) -> Written:
        ckpt = job.checkpoint
        assert isinstance(ckpt, ShardedCheckpoint)
        changed_shards = {ckpt.shard_of[key] for sd, key in job.replacements if sd == ROOT}
        sidecar = ckpt.sidecar if job.geometry is not None else None
        rewritten, copied = [], []
        total = 0
        for name in ckpt.folders:
            (out / name).mkdir()
        for name, source in ckpt.files.items():
            dst = out / name
            mode = permissions(source.stat().st_mode, 0o666)
            shard = ckpt.shards.get(name)
            if shard is not None and name in changed_shards:
                repl = {k: r for k, r in job.replacements.items() if ckpt.shard_of.get(k[1]) == name}
                shard_job = WriteJob(shard, (ROOT,), repl, job.metadata)
                total += self.writers[shard.writer].write(dst, shard_job, progress).bytes
                dst.chmod(mode)
                rewritten.append(name)
            elif (ckpt.index_path is not None and name == ckpt.index_path.name) or name in ckpt.duplicates:
                continue
            elif sidecar is not None and job.geometry is not None and name == sidecar.path.name:
                sidecar.write(dst, *job.geometry, window=job.window, patch_changed=job.patch_changed)
                dst.chmod(mode)
                total += dst.stat().st_size
                rewritten.append(name)
            else:
                size = copy_regular(source, dst, mode=mode)
                total += size
                top = name.split("/")[0]
                if top == name:
                    copied.append(name)
                elif not copied or copied[-1] != top + "/":
                    copied.append(top + "/")
                if progress:
                    progress(size)
        if ckpt.index_path is not None:
            index = dict(ckpt.index)
            meta = dict(index.get("metadata") or {})
            if "total_size" in meta or not meta:
                new = {k: r.shape for (sd, k), r in job.replacements.items() if sd == ROOT}
                meta["total_size"] = sum(
                    nbytes(new.get(k, info.shape), info.dtype) for k, info in ckpt.state_dicts[ROOT].items()
                )  # bytes of tensor data, as transformers counts them
            index["metadata"] = meta
            raw = json.dumps(index, indent=2, sort_keys=False) + "\n"
            dst = out / ckpt.index_path.name
            dst.write_text(raw)
            dst.chmod(permissions(ckpt.index_path.stat().st_mode, 0o666))
            total += len(raw)
            rewritten.append(ckpt.index_path.name)
        for name in ckpt.folders:  # their modes: atomic_folder, once all is written
            if "/" not in name and f"{name}/" not in copied:  # an empty one
                copied.append(f"{name}/")
        copied.sort(key=lambda n: n.rstrip("/"))
        return Written(total, tuple(rewritten), tuple(copied))
