"""Model folders: shards with their index (``model.safetensors.index.json`` or
``pytorch_model.bin.index.json``, as Hugging Face writes them), or one weights file (``model.safetensors``,
``pytorch_model.bin``), beside a ``config.json``.

Read: the index maps every key to its shard; each shard is opened header-first, so a folder of any size
is planned from its headers. Write: a folder out, built in a temp folder beside DST and renamed into place;
only the shards that hold a changed tensor are rewritten (streamed like a single file), every other file
is copied as it is, and the index gets the new total size.

A folder from the internet is not trusted: :func:`scan_folder` lists its regular files, subfolders included,
and refuses a FIFO, a socket or a device anywhere in it, and any link that leads out of it (or to nothing, or
to a folder). A link that stays inside is read (and copied) as the file it points to. The one place links may
lead is a Hugging Face hub cache snapshot (``models--ORG--NAME/snapshots/REV/``, whose files are links to
``../../blobs/SHA``): links into that repository's own ``blobs/`` folder.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointFormatError
from ..keymaps import TensorInfo
from . import _open, describe_kind, open_regular, read_json
from .base import ROOT, Checkpoint

if TYPE_CHECKING:
    import torch

__all__ = ["ShardedCheckpoint", "copy_regular", "find_index", "scan_folder"]

INDEX_SUFFIX = ".safetensors.index.json"
INDEX_SUFFIXES = (INDEX_SUFFIX, ".bin.index.json")  # safetensors shards; torch shards (pytorch_model-*.bin)
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _link_roots(folder: Path) -> tuple[Path, ...]:
    """Where links in a model folder may lead: inside it, and for a hub cache snapshot, its ``blobs/``."""
    real = folder.resolve()
    for p in (real, *real.parents):
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
            return real, p.parent.parent / "blobs"
    return (real,)


def scan_folder(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The regular files of a model folder by relative path (``sub/name``), each with the real path to read,
    and its subfolders (parents first).

    Raises:
        CheckpointFormatError: a FIFO, socket or device anywhere in the folder, or a link that leads out of it
            (other than a hub snapshot's links to its blobs), to nothing, or to a folder.
    """
    roots = _link_roots(folder)
    files: dict[str, Path] = {}
    folders: list[str] = []
    fix = "remove it or replace it with the file"

    def walk(path: Path, rel: str) -> None:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            raise CheckpointFormatError(f"cannot read the folder {path}: {e.strerror or e}") from None
        for entry in entries:
            item, name = Path(entry.path), rel + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:
                raise CheckpointFormatError(f"cannot read {item}: {e.strerror or e}") from None
            if stat.S_ISLNK(st.st_mode):
                real = Path(os.path.realpath(item))
                if not any(root in real.parents for root in roots):
                    raise CheckpointFormatError(f"{item} is a link to {real}, outside the model folder {folder}; {fix}")
                try:
                    st = real.stat()
                except OSError:
                    raise CheckpointFormatError(f"{item} is a link to {real}, which does not exist; {fix}") from None
                if not stat.S_ISREG(st.st_mode):
                    raise CheckpointFormatError(f"{item} is a link to {describe_kind(st.st_mode)}; {fix}")
                files[name] = real
            elif stat.S_ISDIR(st.st_mode):
                folders.append(name)
                walk(item, name + "/")
            elif stat.S_ISREG(st.st_mode):
                files[name] = item
            else:
                raise CheckpointFormatError(
                    f"{item} is {describe_kind(st.st_mode)}, not a file a model folder holds; remove it"
                )

    walk(folder, "")
    return files, folders


def copy_regular(src: Path, dst: Path, *, mode: int) -> int:
    """Copy a regular file (a link in its last component refused: pass the resolved path) to a new ``dst``
    with permission bits ``mode``; returns the bytes copied.

    Raises:
        CheckpointFormatError: ``src`` is not a regular file (any more), or cannot be read.
        OSError: ``dst`` cannot be written.
    """
    with open_regular(src, follow=False) as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fout:
            done = 0
            try:
                if sys.platform != "linux":
                    raise OSError(errno.ENOSYS, "no sendfile between files")
                while n := os.sendfile(fout.fileno(), fin.fileno(), done, 1 << 30):  # in the kernel, as cp does
                    done += n
            except OSError as e:
                if done or e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                shutil.copyfileobj(fin, fout, 1 << 20)
                done = fout.tell()
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
    dict across the files."""

    def __init__(self, folder: Path) -> None:
        self.path = folder
        self.lazy = True
        self.files, self.folders = scan_folder(folder)
        """Every regular file of the folder by relative path, with the real path to read; its subfolders."""
        self.index_path = find_index(folder)
        self.index: dict[str, Any] = {}
        self.duplicates: list[str] = []  # other weights files, left out of a folder output
        self.shards: dict[str, Checkpoint] = {}
        if self.index_path is None:
            self.format = "folder"
            weights, others = _single_weights(folder)
            self.duplicates = [p.name for p in others]
            shard = _open(weights)
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
                self.shards[name] = _open(file)
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
        self.state_dicts = {ROOT: infos}
        self.metadata = {}
        self.extras = []

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

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()
