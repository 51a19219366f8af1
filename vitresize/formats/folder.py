"""Model folders: shards with their index (``model.safetensors.index.json`` or
``pytorch_model.bin.index.json``, as Hugging Face writes them), or one weights file (``model.safetensors``,
``pytorch_model.bin``), beside a ``config.json``.

Read: the index maps every key to its shard; each shard is opened header-first, so a folder of any size
is planned from its headers. Write: a folder out, built in a temp folder beside DST and renamed into place;
only the shards that hold a changed tensor are rewritten (streamed like a single file), every other file
is copied as it is, and the index gets the new total size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointFormatError
from ..keymaps import TensorInfo
from . import _open
from .base import ROOT, Checkpoint

if TYPE_CHECKING:
    import torch

__all__ = ["ShardedCheckpoint", "find_index"]

INDEX_SUFFIX = ".safetensors.index.json"
INDEX_SUFFIXES = (INDEX_SUFFIX, ".bin.index.json")  # safetensors shards; torch shards (pytorch_model-*.bin)
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


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
            index = json.loads(path.read_text())
            weight_map: dict[str, str] = dict(index["weight_map"])
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointFormatError(f"{path} is not a valid index (no weight_map of key -> file)") from None
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
