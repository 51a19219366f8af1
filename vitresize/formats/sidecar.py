"""The ``config.json`` beside a checkpoint: Hugging Face model configs and timm hub configs. Pure Python.

A sidecar tells the geometry the weights were trained at (and so resolves non-square grids without flags),
and a folder conversion writes it back with the new geometry so that weights and config agree:

* Hugging Face (``model_type``): ``image_size`` and ``patch_size``, top level or under ``vision_config``
  (CLIP, SigLIP); an int when square, ``[h, w]`` when not.
* timm hub (``architecture`` + ``pretrained_cfg``): ``pretrained_cfg.input_size = [C, H, W]``, and
  ``model_args.img_size`` / ``patch_size`` (what ``timm.create_model`` builds the model with).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError
from ..resample.geometry import Size

__all__ = ["Sidecar", "find_sidecar"]

CONFIG = "config.json"


def _size(value: Any) -> Size | None:
    if type(value) is int and value > 0:
        return (value, value)
    if isinstance(value, list | tuple) and len(value) == 2 and all(type(v) is int and v > 0 for v in value):
        return (value[0], value[1])
    return None


def _json_size(size: Size) -> int | list[int]:
    return size[0] if size[0] == size[1] else [size[0], size[1]]


@dataclass(frozen=True)
class Sidecar:
    """A parsed sidecar config: where it is, its kind (``hf`` or ``timm``) and the geometry it states."""

    path: Path
    kind: str
    data: dict[str, Any]
    img_size: Size | None
    patch: Size | None

    @property
    def grid(self) -> Size | None:
        if self.img_size is None or self.patch is None:
            return None
        if self.img_size[0] % self.patch[0] or self.img_size[1] % self.patch[1]:
            return None
        return (self.img_size[0] // self.patch[0], self.img_size[1] // self.patch[1])

    def describe(self) -> str:
        img = "?" if self.img_size is None else f"{self.img_size[0]}x{self.img_size[1]}"
        patch = "?" if self.patch is None else f"{self.patch[0]}x{self.patch[1]}"
        return f"{self.path} ({self.kind}: image {img}, patch {patch})"

    def updated(self, img_size: Size, patch: Size) -> dict[str, Any]:
        """The config with the new geometry; every other entry as it was."""
        data = copy.deepcopy(self.data)
        if self.kind == "hf":
            target = data["vision_config"] if isinstance(data.get("vision_config"), dict) else data
            target["image_size"] = _json_size(img_size)
            target["patch_size"] = _json_size(patch)
            return data
        cfg = data.setdefault("pretrained_cfg", {})
        channels = cfg.get("input_size", [3])[0] if isinstance(cfg.get("input_size"), list) else 3
        cfg["input_size"] = [channels, img_size[0], img_size[1]]
        args = data.setdefault("model_args", {})
        args["img_size"] = _json_size(img_size)
        if "patch_size" in args or patch != self.patch:
            args["patch_size"] = _json_size(patch)
        return data

    def write(self, dst: Path, img_size: Size, patch: Size) -> None:
        dst.write_text(json.dumps(self.updated(img_size, patch), indent=2) + "\n")


def _parse(path: Path, data: dict[str, Any]) -> Sidecar | None:
    if "model_type" in data or "vision_config" in data:
        node = data["vision_config"] if isinstance(data.get("vision_config"), dict) else data
        return Sidecar(path, "hf", data, _size(node.get("image_size")), _size(node.get("patch_size")))
    cfg = data.get("pretrained_cfg")
    if "architecture" in data and isinstance(cfg, dict):
        args = data.get("model_args")
        args = args if isinstance(args, dict) else {}
        size = cfg.get("input_size")
        img = _size(args.get("img_size")) or (
            _size(list(size[1:])) if isinstance(size, list) and len(size) == 3 else None
        )
        return Sidecar(path, "timm", data, img, _size(args.get("patch_size")))
    return None


def find_sidecar(src: Path) -> Sidecar | None:
    """The ``config.json`` of a model folder, or beside a weights file; ``None`` if there is none (or it is
    not a model config).

    Raises:
        CheckpointFormatError: the file exists but is not valid JSON.
    """
    path = (src if src.is_dir() else src.parent) / CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    return _parse(path, data) if isinstance(data, dict) else None
