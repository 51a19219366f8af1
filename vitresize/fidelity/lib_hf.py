"""The transformers runner of ``vitresize check``: every ``hf*`` family (``hf``: ViT, DeiT, DINOv2; ``hf-clip``: CLIP
and SigLIP; ``hf-beit``, ``hf-swin``, ``hf-swinv2``).

The model is built from the checkpoint's ``config.json`` (``AutoConfig.for_model``; the class is the config's
``architectures[0]``, or the one named by ``model``) at the checkpoint's geometry, never with ``from_pretrained``:
the state dict vitresize read is loaded strictly, after transformers' own key renamings (transformers 5 names some
keys differently in memory than ``save_pretrained`` writes them). Without a config, a plain ViT (``hf``) is inferred
from the shapes of its weights. Images are preprocessed by the folder's ``preprocessor_config.json`` processor, or by
the model type's default one, resized to the model's input size.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointFormatError, GeometryError, UsageError, param
from .base import (
    Architecture,
    LoadResult,
    Outputs,
    Runner,
    Side,
    on_grid,
    require,
    standard_heads,
    strict_load,
    strip_prefix,
)

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

    from ..resample.geometry import Size

__all__ = ["build"]

PREPROCESSOR = "preprocessor_config.json"

TEXT_TOWER = ("text_model.", "text_projection.", "logit_scale", "logit_bias")
"""The keys of a CLIP / SigLIP checkpoint that a vision-only model has no place for."""

NOT_PLAIN_VIT = ("embeddings.distillation_token", "embeddings.register_tokens", "embeddings.mask_token")
"""Keys that say a ``hf`` checkpoint is not a plain ``ViTModel`` (DeiT, DINOv2): its config cannot be inferred."""

EXAMPLES = {
    "hf": "ViTForImageClassification",
    "hf-clip": "CLIPVisionModel or SiglipVisionModel",
    "hf-beit": "BeitForImageClassification",
    "hf-swin": "SwinForImageClassification",
    "hf-swinv2": "Swinv2ForImageClassification",
}

LAYOUTS = {
    # family -> (the layers' key prefix, the MLP's first weight inside a layer: ViT / DeiT, DINOv2, CLIP / SigLIP)
    "hf": ("encoder.layer.", ("intermediate.dense.weight", "mlp.fc1.weight")),
    "hf-clip": ("encoder.layers.", ("mlp.fc1.weight",)),
}

ARG_NAMES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "mlp_ratio")


def build(side: Side, *, model: str | None = None, device: str = "cpu") -> Runner:
    """The transformers model of ``side`` at its geometry, its state dict loaded strictly when it fits.

    Args:
        side: the checkpoint (an ``hf*`` family).
        model: a transformers model class to build instead of the config's (``"ViTForImageClassification"``).
        device: where the model runs.

    Returns:
        The runner; ``runner.load.ok`` is ``False`` when the state dict does not fit (the model then keeps its
        random weights).

    Raises:
        GeometryError: the architecture cannot be told (no config.json and weights that do not say it), or
            transformers cannot build it at this geometry.
        UsageError: ``model`` is not a transformers model class.
        CheckpointFormatError: transformers cannot read the config.json, or the preprocessor_config.json is not
            a JSON object.
        MissingDependencyError: transformers is not installed.
    """
    transformers = require("transformers")
    config, cls, architecture, vision_only = _architecture(transformers, side, model)
    net = _instantiate(transformers, cls, config, side)
    state_dict = _library_state_dict(side, net, vision_only=vision_only)
    load = strict_load(net, state_dict)
    if _drop_pooler(net, load):  # a backbone class named for a classifier's file: built as the classifier does
        load = strict_load(net, state_dict)
        architecture = dataclasses.replace(architecture, note=_join(architecture.note, "built without its pooler"))
    processor = _processor(transformers, side, net.config.model_type, side.img_size)
    return _HFRunner(net.to(device).eval(), processor, side, architecture, load, device)


# ---------------------------------------------------------------- architecture


def _architecture(transformers: Any, side: Side, model: str | None) -> tuple[Any, Any, Architecture, bool]:
    """The config (at the side's geometry), the model class (``None``: ``AutoModel``), the record and whether the
    model is a vision tower built out of a composite (CLIP-like) checkpoint."""
    given = _model_class(transformers, model) if model is not None else None
    if side.config is not None and side.config_kind == "hf":
        config = _config(transformers, side, given)
        archs = side.config.get("architectures")
        name = archs[0] if isinstance(archs, list) and archs else None
        cls = given or (_model_class(transformers, name, strict=False) if isinstance(name, str) else None)
        vision_only = False
        if given is not None:
            config, vision_only = _config_for(given, config, side)
        source, note = ("--model" if given is not None else "config"), ""
    else:
        config, cls, note = _inferred(transformers, side, given)
        source, vision_only = ("--model" if given is not None else "inferred"), False
    _set_geometry(config, side)
    name = cls.__name__ if cls is not None else "AutoModel"
    return config, cls, Architecture("transformers", name, _args(config, name), source, note), vision_only


def _model_class(transformers: Any, name: str | None, *, strict: bool = True) -> Any:
    """The transformers model class called ``name``; ``None`` (or a UsageError when ``strict``) if there is none."""
    cls: Any = getattr(transformers, name, None) if name else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and getattr(cls, "config_class", None):
        return cls
    if strict:
        raise UsageError(
            f"{param('model')} {name!r} is not a transformers model class; pass one such as "
            f"ViTForImageClassification, Dinov2Model or CLIPVisionModel"
        )
    return None


def _config(transformers: Any, side: Side, given: Any) -> Any:
    """The transformers config of ``side.config``: its ``model_type`` picks the class (without one, the config
    class of the model class ``given``)."""
    data = dict(side.config or {})
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str) and given is not None:
        return _config_for(given, None, side)[0]
    if not isinstance(model_type, str):
        raise GeometryError(
            f"{side.path}: its config.json has no model_type, so transformers cannot build it; "
            f"add the model_type or pass {param('model')} NAME (e.g. {EXAMPLES.get(side.family, 'ViTModel')})"
        )
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except Exception as e:  # transformers validates configs with its own exception classes
        raise CheckpointFormatError(
            f"{side.path}: transformers cannot read its config.json ({_first_line(e)}); fix the config.json"
        ) from None


def _config_for(cls: Any, config: Any, side: Side) -> tuple[Any, bool]:
    """``config`` as ``cls`` takes it: its vision config for a vision tower of a composite config, or the same
    fields read as ``cls``'s config class; and whether that made a vision-only model."""
    if isinstance(config, cls.config_class):
        return config, False
    vision = getattr(config, "vision_config", None)
    if isinstance(vision, cls.config_class):
        if getattr(config, "projection_dim", None) is not None and hasattr(vision, "projection_dim"):
            vision.projection_dim = config.projection_dim  # the composite's, not the vision config's default
        return vision, True
    data = {k: v for k, v in (side.config or {}).items() if k != "model_type"}
    try:
        return cls.config_class(**data), False
    except Exception as e:  # transformers validates configs with its own exception classes
        raise GeometryError(
            f"{side.path}: its config.json does not fit {cls.__name__} ({_first_line(e)}); "
            f"pass another {param('model')} or none"
        ) from None


def _inferred(transformers: Any, side: Side, given: Any) -> tuple[Any, Any, str]:
    """A config read from the weights' shapes (no config.json): a plain ViT, or the class ``given`` names."""
    if side.family not in LAYOUTS or (given is None and side.family != "hf"):
        raise _cannot_tell(side)
    sd = strip_prefix(side.state_dict, side.prefix)
    if given is None and any(k in sd for k in NOT_PLAIN_VIT):
        raise _cannot_tell(side)
    args, note = _shapes(side, sd)
    if given is None:
        given = transformers.ViTForImageClassification if "num_labels" in args else transformers.ViTModel
    config = given.config_class()
    for key, value in args.items():
        if key == "num_labels":
            config.num_labels = value
        elif hasattr(config, key):
            with contextlib.suppress(Exception):  # a field of another type: its default stays (the load tells)
                setattr(config, key, value)
    return config, given, note


def _shapes(side: Side, sd: dict[str, torch.Tensor]) -> tuple[dict[str, Any], str]:
    """Width, depth, heads (a guess: ``note`` says so), MLP size, biases and classes from the weights."""
    layers, fc1 = LAYOUTS[side.family]
    pos_key = side.embedding.pos_key
    mlp = next((sd[layers + "0." + k] for k in fc1 if layers + "0." + k in sd), None)
    if pos_key is None or pos_key not in side.state_dict or mlp is None:
        raise _cannot_tell(side)
    width = int(side.state_dict[pos_key].shape[-1])
    depth = len({k[len(layers) :].split(".", 1)[0] for k in sd if k.startswith(layers)})
    heads, note = standard_heads(width)
    args: dict[str, Any] = {
        "hidden_size": width,
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "intermediate_size": int(mlp.shape[0]),
        "mlp_ratio": int(mlp.shape[0]) // width if mlp.shape[0] % width == 0 else int(mlp.shape[0]) / width,
        "qkv_bias": layers + "0.attention.attention.query.bias" in sd,
        "num_register_tokens": _rows(sd.get("embeddings.register_tokens")),
        "vision_use_head": "head.probe" in sd,
    }
    outer = side.prefix[: -len("vit.")] if side.prefix.endswith("vit.") else side.prefix
    head = side.state_dict.get(outer + "classifier.weight")
    if side.family == "hf" and head is not None:
        args["num_labels"] = int(head.shape[0])
    return args, note


def _rows(tokens: torch.Tensor | None) -> int:
    return int(tokens.shape[1]) if tokens is not None and tokens.dim() == 3 else 0


def _cannot_tell(side: Side) -> GeometryError:
    if side.family not in LAYOUTS:
        how = f"keep its config.json beside it (transformers' {side.family} models need one)"
    else:
        how = f"pass {param('model')} NAME (e.g. {EXAMPLES[side.family]}) or keep its config.json beside it"
    return GeometryError(
        f"{side.family} checkpoint: cannot tell the architecture of {side.path} from its weights; {how}"
    )


def _set_geometry(config: Any, side: Side) -> None:
    """Build at the side's geometry (the config may state the old one): on the vision config of a composite."""
    vision = getattr(config, "vision_config", None) or config
    vision.image_size = _int_or_pair(side.img_size)
    vision.patch_size = _int_or_pair(side.patch)
    if side.window is not None and hasattr(vision, "window_size"):
        vision.window_size = _int_or_pair(side.window)


def _int_or_pair(size: Size) -> int | list[int]:
    return size[0] if size[0] == size[1] else [size[0], size[1]]


def _args(config: Any, name: str) -> dict[str, Any]:
    """The architecture's main fields, for the report (geometry apart)."""
    vision = getattr(config, "vision_config", None) or config
    args = {"model_type": config.model_type}
    args.update({k: getattr(vision, k) for k in ARG_NAMES if getattr(vision, k, None) is not None})
    if "ForImageClassification" in name:
        args["num_labels"] = config.num_labels
    return args


def _instantiate(transformers: Any, cls: Any, config: Any, side: Side) -> Any:
    """``cls(config)`` (``AutoModel`` when no class is named), random weights, eval mode."""
    try:
        return cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception as e:  # transformers rejects a geometry its model cannot take with assorted errors
        h, w = side.img_size
        raise GeometryError(
            f"{side.path}: transformers cannot build {getattr(cls, '__name__', 'AutoModel')} at {h}x{w} with "
            f"{side.patch[0]}x{side.patch[1]} patches ({_first_line(e)}); check its config.json or pass "
            f"{param('model')} NAME"
        ) from None


def _drop_pooler(net: Any, load: LoadResult) -> bool:
    """Whether the only keys missing were a base model's pooler (``ViTModel`` has one, the file of a
    ``ViTForImageClassification`` has none): that pooler is then removed, as ``add_pooling_layer=False`` does."""
    if not load.missing or load.unexpected or load.mismatched:
        return False
    owners = {k.rpartition("pooler.")[0] for k in load.missing if "pooler." in k}
    if len(owners) != 1 or not all(k.startswith(next(iter(owners)) + "pooler.") for k in load.missing):
        return False
    owner = net.get_submodule(next(iter(owners)).rstrip("."))
    if getattr(owner, "pooler", None) is None:
        return False
    owner.pooler = None
    return True


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


# ---------------------------------------------------------------- keys


def _library_state_dict(side: Side, net: Any, *, vision_only: bool) -> dict[str, torch.Tensor]:
    """The file's tensors under the model's own keys: its prefix swapped for the model's (``vision_model.`` off for
    ``CLIPVisionModel``, ``module.`` off), the text tower dropped for a vision-only model, transformers' renamings
    applied (``attention.self.query`` -> ``attention.q_proj``)."""
    expected = list(net.state_dict())
    suffix = side.embedding.patch_key[len(side.prefix) :]
    theirs = next((k for k in expected if k == suffix or k.endswith("." + suffix)), None)
    mine, own = side.prefix, (theirs[: len(theirs) - len(suffix)] if theirs is not None else side.prefix)
    if mine.endswith(own):
        sd = strip_prefix(side.state_dict, mine[: len(mine) - len(own)])
    else:
        sd = {own + k[len(mine) :]: v for k, v in side.state_dict.items() if k.startswith(mine)}
    if vision_only:
        sd = {k: v for k, v in sd.items() if not k.startswith(TEXT_TOWER)}
    rename = _renamer(net)
    return {rename(k): v for k, v in sd.items()}


def _renamer(net: Any) -> Callable[[str], str]:
    """transformers' checkpoint -> model key renamings for ``net`` (the identity where transformers has none).
    Conversions that split or merge tensors are not applied: their keys then fail the strict load."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: checkpoints hold the model's own names
        return str
    renamings = [t for t in get_model_conversion_mapping(net) if isinstance(t, WeightRenaming)]

    def rename(key: str) -> str:
        return str(rename_source_key(key, renamings, [])[0])

    return rename


# ---------------------------------------------------------------- preprocessing


def _processor(transformers: Any, side: Side, model_type: str, size: Size) -> Any:
    """The folder's image processor (``preprocessor_config.json``) or the model type's default one, resizing (and
    centre-cropping, where it crops) to ``size``."""
    data = _preprocessor_config(side)
    name = data.get("image_processor_type") or str(data.get("feature_extractor_type") or "")
    cls = _class(transformers, name.replace("FeatureExtractor", "ImageProcessor")) if name else None
    cls = cls or _default_processor_class(transformers, side, model_type)
    base = cls.from_dict(dict(data))
    h, w = size
    new: dict[str, Any] = {"size": {"height": h, "width": w}}
    if h == w and _field(base.size, "shortest_edge") is not None:
        new["size"] = {"shortest_edge": h}
    if getattr(base, "crop_size", None) is not None:
        new["crop_size"] = {"height": h, "width": w}
    return cls.from_dict(dict(data), **new)


def _preprocessor_config(side: Side) -> dict[str, Any]:
    """``preprocessor_config.json`` of the checkpoint's folder (beside its file), ``{}`` when there is none."""
    from ..formats import read_json

    folder = side.path if side.path.is_dir() else side.path.parent
    path = folder / PREPROCESSOR
    if not path.exists():
        return {}
    try:
        data = read_json(path, PREPROCESSOR)
    except ValueError as e:
        raise CheckpointFormatError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path} is not a JSON object; fix or remove it")
    return data


def _default_processor_class(transformers: Any, side: Side, model_type: str) -> Any:
    """transformers' image processor of ``model_type`` (or of the type it derives from: ``clip`` for
    ``clip_vision_model``, ``dinov2`` for ``dinov2_with_registers``), as ``AutoImageProcessor`` picks it."""
    names = require("transformers.models.auto.image_processing_auto").IMAGE_PROCESSOR_MAPPING_NAMES
    for kind in (model_type, model_type.removesuffix("_vision_model"), model_type.split("_with_", 1)[0]):
        cls = _class(transformers, _backend_name(names.get(kind)))
        if cls is not None:
            return cls
    raise CheckpointFormatError(
        f"{side.path}: transformers has no image processor for model type {model_type!r}; "
        f"add a {PREPROCESSOR} beside the checkpoint"
    )


def _backend_name(entry: Any) -> str | None:
    """A processor class name from a mapping entry: ``{"torchvision": ..., "pil": ...}`` (transformers 5, the
    torchvision one where torchvision is installed), ``(slow, fast)`` (transformers 4) or a name."""
    if isinstance(entry, dict):
        import importlib.util

        first = "torchvision" if importlib.util.find_spec("torchvision") is not None else "pil"
        return entry.get(first) or next((v for v in entry.values() if v), None)
    if isinstance(entry, (tuple, list)):
        return next((v for v in reversed(entry) if v), None)
    return entry if isinstance(entry, str) else None


def _class(transformers: Any, name: str | None) -> Any:
    cls = getattr(transformers, name, None) if name else None
    return cls if isinstance(cls, type) else None


def _field(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


# ---------------------------------------------------------------- running


class _HFRunner(Runner):
    """A transformers model, its processor and how to read its outputs."""

    def __init__(
        self, net: Any, processor: Any, side: Side, architecture: Architecture, load: LoadResult, device: str
    ) -> None:
        self.model = net
        self.processor = processor
        self.architecture = architecture
        self.load = load
        self.input_size = side.img_size
        self.family = side.family
        self.grid = side.grid
        self.device = device

    def preprocess(self, image: Image) -> torch.Tensor:
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        return pixels[0].float()  # type: ignore[no-any-return]

    def forward(self, batch: torch.Tensor) -> Outputs:
        torch = require("torch")
        with torch.inference_mode():
            x = batch.to(device=self.device, dtype=torch.float32)
            logits, pooled, hidden = self._run(x)
            return Outputs.of(logits, pooled, on_grid(hidden, self.grid))

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(logits, pooled, last_hidden_state)`` of one batch."""
        net = self.model
        if hasattr(net, "get_image_features") and hasattr(net, "vision_model"):  # CLIPModel, SiglipModel
            seen, result = _hooked(net.vision_model, lambda: net.get_image_features(pixel_values=x))
            pooled = result if isinstance(result, require("torch").Tensor) else result.pooler_output
            return None, pooled, seen.last_hidden_state
        base = net.base_model
        seen, out = _hooked(base, lambda: net(pixel_values=x)) if base is not net else (None, net(pixel_values=x))
        inner = seen if seen is not None else out
        logits = getattr(out, "logits", None)
        return logits, self._pooled(out, inner), inner.last_hidden_state

    def _pooled(self, out: Any, inner: Any) -> torch.Tensor:
        """What the head reads: the (final-normed) class token of a ViT, the image embedding of a CLIP tower, the
        pooled output of BEiT / Swin."""
        hidden = inner.last_hidden_state
        if self.family == "hf":
            return hidden[:, 0]  # type: ignore[no-any-return]
        if self.family == "hf-clip":
            embeds = getattr(out, "image_embeds", None)
            if embeds is not None:
                return embeds  # type: ignore[no-any-return]
        pooled = getattr(inner, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)  # type: ignore[no-any-return]
        return hidden[:, 0] if self.family != "hf-clip" else hidden.mean(1)  # type: ignore[no-any-return]


def _hooked(module: Any, call: Callable[[], Any]) -> tuple[Any, Any]:
    """``(what module returned, what call returned)``: the first output of ``module`` during ``call``."""
    seen: list[Any] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out) if not seen else None)
    try:
        result = call()
    finally:
        handle.remove()
    return (seen[0] if seen else None), result
