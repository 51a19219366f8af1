"""The ``config.json`` beside a checkpoint: Hugging Face model configs and timm hub configs. Pure Python.

A sidecar tells the geometry the weights were trained at (and so resolves non-square grids without flags),
and a folder conversion writes it back with the new geometry so that weights and config agree:

* Hugging Face (``model_type``): ``image_size`` and ``patch_size``, top level or under ``vision_config``
  (CLIP, SigLIP); an int when square, ``[h, w]`` when not.
* timm hub (``architecture`` + ``pretrained_cfg``): ``pretrained_cfg.input_size = [C, H, W]``, and
  ``model_args.img_size`` / ``patch_size`` (what ``timm.create_model`` builds the model with); a new attention
  window goes to ``window_size`` (``model_args.window_size`` for timm).

A model config whose ``vision_config``, ``pretrained_cfg`` or ``model_args`` is not an object (``null`` reads
as absent), or whose ``input_size`` is not ``[C, H, W]``, is refused with one line naming the field: it
cannot be updated without guessing.
"""

from __future__ import annotations

import copy
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError
from ..resample.geometry import Size
from ._files import is_folder, read_json

__all__ = ["Sidecar", "find_sidecar"]

CONFIG = "config.json"


def _size(value: Any) -> Size | None:
    if type(value) is int and value > 0:
        return (value, value)
    if isinstance(value, list | tuple) and len(value) == 2 and all(type(v) is int and v > 0 for v in value):
        return (value[0], value[1])
    return None


def _input_size(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(type(v) is int and v > 0 for v in value)


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

    def updated(
        self, img_size: Size, patch: Size, window: Size | None = None, *, patch_changed: bool = True
    ) -> dict[str, Any]:
        """The config with the new geometry (and attention window); every other entry as it was. A timm config
        gets a ``patch_size`` it did not state only when the patch changes (a family whose patch is a stem's
        stride takes no such argument)."""
        data = copy.deepcopy(self.data)
        if self.kind == "hf":
            target = data["vision_config"] if isinstance(data.get("vision_config"), dict) else data
            target["image_size"] = _json_size(img_size)
            target["patch_size"] = _json_size(patch)
            if window is not None:
                target["window_size"] = _json_size(window)
            return data
        cfg = data["pretrained_cfg"]  # an object: _parse checked it
        channels = cfg["input_size"][0] if _input_size(cfg.get("input_size")) else 3
        cfg["input_size"] = [channels, img_size[0], img_size[1]]
        if not isinstance(data.get("model_args"), dict):
            data["model_args"] = {}
        args = data["model_args"]
        args["img_size"] = _json_size(img_size)
        if "patch_size" in args or (patch_changed and patch != self.patch):
            args["patch_size"] = _json_size(patch)
        if window is not None:
            args["window_size"] = _json_size(window)
        return data

    def write(
        self, dst: Path, img_size: Size, patch: Size, *, window: Size | None = None, patch_changed: bool = True
    ) -> None:
        data = self.updated(img_size, patch, window, patch_changed=patch_changed)
        dst.write_text(json.dumps(data, indent=2) + "\n")


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}


def _object(path: Path, node: dict[str, Any], field: str) -> dict[str, Any]:
    """``node[field]`` when it is an object, ``{}`` when it is absent or null; else a one-line error."""
    value = node.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        kind = "true/false" if isinstance(value, bool) else _JSON_TYPES.get(type(value), type(value).__name__)
        raise CheckpointFormatError(
            f"{path}: {field} is {kind}, not an object as in a model config; fix the field or remove {path.name}"
        )
    return value


def _parse(path: Path, data: dict[str, Any]) -> Sidecar | None:
    if "model_type" in data or "vision_config" in data:
        vision = _object(path, data, "vision_config")
        node = vision if isinstance(data.get("vision_config"), dict) else data
        return Sidecar(path, "hf", data, _size(node.get("image_size")), _size(node.get("patch_size")))
    if "architecture" in data and "pretrained_cfg" in data:
        if data["pretrained_cfg"] is None:
            return None
        cfg = _object(path, data, "pretrained_cfg")
        args = _object(path, data, "model_args")
        size = cfg.get("input_size")
        if size is not None and not _input_size(size):
            raise CheckpointFormatError(
                f"{path}: pretrained_cfg.input_size is {json.dumps(size)[:40]}, not [C, H, W] as in a timm config; "
                f"fix the field or remove {path.name}"
            )
        img = _size(args.get("img_size")) or (_size(size[1:]) if size is not None else None)
        return Sidecar(path, "timm", data, img, _size(args.get("patch_size")))
    return None


def find_sidecar(src: Path) -> Sidecar | None:
    """The ``config.json`` of a model folder, or beside a weights file; ``None`` if there is none (or it is
    not a model config).

    Raises:
        CheckpointFormatError: the file exists but is not valid JSON, is over the size or depth budgets of
            :func:`~vitresize.formats.read_json`, is not a regular file (a FIFO, a device, a socket), or is a
            model config with a field of the wrong type.
    """
    path = (src if is_folder(src) else src.parent) / CONFIG
    try:
        if stat.S_ISDIR(path.stat().st_mode):
            return None
    except OSError:  # none there (or a link to nothing): no sidecar
        return None
    try:
        data = read_json(path, CONFIG)
    except ValueError as e:
        raise CheckpointFormatError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    return _parse(path, data) if isinstance(data, dict) else None
