"""Sharded safetensors folders (``model.safetensors.index.json`` + shards, as Hugging Face writes them).

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
from .base import ROOT, Checkpoint
from .safetensors import SafetensorsCheckpoint

if TYPE_CHECKING:
    import torch

__all__ = ["ShardedCheckpoint", "find_index"]

INDEX_SUFFIX = ".safetensors.index.json"


def find_index(folder: Path) -> Path:
    """The one ``*.safetensors.index.json`` of a folder."""
    found = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise CheckpointFormatError(
            f"{folder} is a folder with {what} *{INDEX_SUFFIX} file(s); pass the checkpoint file inside it, "
            f"or a folder of safetensors shards with one index"
        )
    return found[0]


class ShardedCheckpoint(Checkpoint):
    """A folder of safetensors shards read through its index: one flat state dict across the shards."""

    def __init__(self, folder: Path) -> None:
        self.path = folder
        self.format = "safetensors-sharded"
        self.lazy = True
        self.index_path = find_index(folder)
        try:
            index = json.loads(self.index_path.read_text())
            weight_map: dict[str, str] = dict(index["weight_map"])
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointFormatError(
                f"{self.index_path} is not a valid index (no weight_map of key -> file)"
            ) from None
        self.index: dict[str, Any] = index
        self.shards: dict[str, SafetensorsCheckpoint] = {}
        for name in dict.fromkeys(weight_map.values()):
            file = folder / name
            if Path(name).name != name or not file.is_file():
                raise CheckpointFormatError(f"{self.index_path} names shard {name!r}, which is not a file in {folder}")
            self.shards[name] = SafetensorsCheckpoint(file)
        self.shard_of: dict[str, str] = {}
        infos: dict[str, TensorInfo] = {}
        for name, shard in self.shards.items():
            for key, info in shard.state_dicts[ROOT].items():
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

    def tensor(self, state_dict: str, key: str) -> torch.Tensor:
        return self.shards[self.shard_of[key]].tensor(ROOT, key)

    def count_nonfinite(self, state_dict: str, key: str) -> int:
        return self.shards[self.shard_of[key]].count_nonfinite(ROOT, key)

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()
