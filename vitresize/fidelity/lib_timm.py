"""The timm runner of ``check``: timm's families, DeiT, and JAX ``.npz`` files through timm's own JAX loader.

The architecture comes from ``--model`` (any timm name), a timm ``config.json`` (``architecture``,
``model_args``), or, for a plain ViT (DeiT included), the state dict's shapes; the model is built with
``timm.create_model(name, pretrained=False, img_size=..., patch_size=..., ...)`` and preprocessed with timm's
eval transform (``resolve_data_config`` + ``create_transform``) at its input size.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING, Any

from ..errors import GeometryError, UsageError, param
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

    from ..resample.geometry import Size

__all__ = ["build"]

_BLOCK = re.compile(r"blocks\.(\d+)\.")


def _square(s: Size) -> int | tuple[int, int]:
    return s[0] if s[0] == s[1] else (s[0], s[1])


def _infer_vit(sd: dict[str, torch.Tensor], side: Side) -> Architecture:
    """A plain timm ViT (or DeiT) from its keys and shapes."""
    if side.family != "timm" or "patch_embed.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        raise GeometryError(
            f"cannot tell the architecture of {side.path} from its weights (a {side.family} model, not a plain "
            f"ViT); pass {param('model')} NAME (the timm model name, e.g. swin_tiny_patch4_window7_224), or keep "
            f"the timm config.json beside it"
        )
    width = sd["patch_embed.proj.weight"].shape[0]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k)))
    heads, note = standard_heads(width)
    args: dict[str, Any] = {
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "num_classes": sd["head.weight"].shape[0] if "head.weight" in sd else 0,
    }
    if "blocks.0.mlp.fc1_g.weight" in sd or "blocks.0.mlp.fc1_x.weight" in sd:
        raise GeometryError(
            f"cannot tell the architecture of {side.path} from its weights (a gated MLP); pass {param('model')} NAME"
        )
    if "blocks.0.attn.q_norm.weight" in sd:
        args["qk_norm"] = True
    if "blocks.0.ls1.gamma" in sd:
        args["init_values"] = 1e-5
    if "norm_pre.weight" in sd:
        args["pre_norm"] = True
    rows = sd["pos_embed"].shape[-2] if "pos_embed" in sd else None
    cls = "cls_token" in sd
    args["class_token"] = cls
    if "reg_token" in sd:
        args["reg_tokens"] = sd["reg_token"].shape[1]
    if "attn_pool.latent" in sd:
        args["global_pool"] = "map"
    elif "fc_norm.weight" in sd:
        args.update(global_pool="avg", fc_norm=True)
    elif not cls:
        args["global_pool"] = "avg"
    if rows is not None and rows == side.grid[0] * side.grid[1] and (cls or "reg_token" in sd):
        args["no_embed_class"] = True
    name = "vit_base_patch16_224"
    if "dist_token" in sd:
        name = "deit_base_distilled_patch16_224"
        args.pop("class_token")
    return Architecture("timm", name, args, "inferred", note)


def _npz_arrays(side: Side) -> dict[str, Any]:
    """The side's tensors as the numpy arrays of a JAX .npz, keys as in the file."""
    return {k: v.numpy() for k, v in side.state_dict.items()}


def _infer_npz(side: Side) -> Architecture:
    """A timm ViT that timm's ``_load_weights`` fills from a vit_jax or big_vision ``.npz``."""
    w = side.state_dict
    p = side.prefix
    kernel = w[p + "embedding/kernel"]  # HWIO
    width = kernel.shape[-1]
    scanned = p + "Transformer/encoderblock/LayerNorm_0/scale" in w
    if scanned:
        depth = w[p + "Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
        block = p + "Transformer/encoderblock/"
        mha, mlp, lead = "MultiHeadDotProductAttention_0", "MlpBlock_0", 1
    else:
        depth = len({m.group(1) for k in w if (m := re.match(re.escape(p) + r"Transformer/encoderblock_(\d+)/", k))})
        block = p + "Transformer/encoderblock_0/"
        big = p + "pos_embedding" in w
        mha, mlp, lead = ("MultiHeadDotProductAttention_0", "MlpBlock_0", 0) if big else (
            "MultiHeadDotProductAttention_1", "MlpBlock_3", 0)  # fmt: skip
    heads = w[f"{block}{mha}/query/kernel"].shape[lead + 1]
    hidden = w[f"{block}{mlp}/Dense_0/kernel"].shape[-1]
    args: dict[str, Any] = {
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": hidden / width,
        "num_classes": w[p + "head/kernel"].shape[-1] if p + "head/kernel" in w else 0,
        "class_token": p + "cls" in w,
    }
    if p + "MAPHead_0/probe" in w:
        args["global_pool"] = "map"
    elif not args["class_token"]:
        args["global_pool"] = "avg"
    return Architecture("timm", "vit_base_patch16_224", args, "inferred", "")


def _from_config(side: Side) -> Architecture | None:
    cfg = side.config
    if side.config_kind != "timm" or not cfg or not isinstance(cfg.get("architecture"), str):
        return None
    args = dict(cfg.get("model_args") or {})
    if isinstance(cfg.get("num_classes"), int):
        args.setdefault("num_classes", cfg["num_classes"])
    for geometry in ("img_size", "patch_size", "window_size"):
        args.pop(geometry, None)
    return Architecture("timm", cfg["architecture"], args, "config")


def _create(arch: Architecture, side: Side, device: str) -> torch.nn.Module:
    """timm's model of ``arch`` at the side's geometry (the patch and window passed only where they differ from
    what the name builds, so families whose constructor does not take them still build)."""
    timm = require("timm")
    geometry: dict[str, Any] = {"img_size": _square(side.img_size)}
    if side.window is not None:
        geometry["window_size"] = _square(side.window)

    def create(**extra: Any) -> Any:
        try:
            return timm.create_model(arch.name, pretrained=False, **{**arch.args, **extra})
        except TypeError:
            if "window_size" not in extra:
                raise
            extra.pop("window_size")  # a family whose windows follow its image size (its window is not an argument)
            return timm.create_model(arch.name, pretrained=False, **{**arch.args, **extra})

    try:
        model = create(**geometry)
        built = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if built is not None and tuple(built) != tuple(side.patch) and side.embedding.stem is None:
            model = create(**geometry, patch_size=_square(side.patch))
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UsageError(
                f"{param('model')} {arch.name!r} is not a timm model name; see timm.list_models()"
            ) from None
        raise
    ready: torch.nn.Module = model.eval().to(device)
    return ready


class TimmRunner(Runner):
    def __init__(self, side: Side, arch: Architecture, device: str) -> None:
        self.architecture = arch
        self.device = device
        self.input_size = side.img_size
        self.model: Any = _create(arch, side, device)
        self.grid = side.grid
        if side.format == "npz":
            self.load = self._load_npz(side)
        else:
            self.load = strict_load(self.model, _fit_head(self.model, strip_prefix(side.state_dict, side.prefix)))
        data = require("timm.data")
        cfg = data.resolve_data_config({"input_size": (3, *side.img_size)}, model=self.model)
        self.transform = data.create_transform(**cfg)

    def _load_npz(self, side: Side) -> LoadResult:
        """timm's own JAX loader, after checking that it will not resample anything itself (it would: a table or
        kernel of another shape is interpolated silently, which a strict load must report)."""
        import numpy as np

        vit = require("timm.models.vision_transformer")
        w, p = side.state_dict, side.prefix
        pos = w.get(p + "pos_embedding", w.get(p + "Transformer/posembed_input/pos_embedding"))
        mismatched = []
        model_pos = getattr(self.model, "pos_embed", None)
        if pos is not None and model_pos is not None and pos.numel() != model_pos.numel():
            mismatched.append(f"position table: file {list(pos.shape)} vs model {list(model_pos.shape)}")
        kernel = w[p + "embedding/kernel"]
        model_kernel = self.model.patch_embed.proj.weight
        if tuple(kernel.shape[:2]) != tuple(model_kernel.shape[-2:]):
            mismatched.append(f"embedding/kernel: file {list(kernel.shape)} vs model {list(model_kernel.shape)}")
        if mismatched:
            return LoadResult(mismatched=tuple(mismatched))
        buf = io.BytesIO()
        np.savez(buf, **_npz_arrays(side))
        buf.seek(0)
        try:
            vit._load_weights(self.model, buf, prefix=p)
        except KeyError as e:
            return LoadResult(missing=(str(e),))
        except (RuntimeError, ValueError) as e:
            return LoadResult(mismatched=(str(e).splitlines()[0],))
        return LoadResult()

    def forward(self, batch: torch.Tensor) -> Outputs:
        import torch

        with torch.inference_mode():
            feats = self.model.forward_features(batch.to(self.device))
            pooled = self.model.forward_head(feats, pre_logits=True)
            logits = self.model.forward_head(feats) if getattr(self.model, "num_classes", 0) else None
            if feats.ndim == 3:
                patches = on_grid(feats, self.grid)
            elif feats.shape[-1] == pooled.shape[-1]:  # NHWC (Swin, ...)
                patches = feats
            else:  # NCHW
                patches = feats.permute(0, 2, 3, 1)
        return Outputs.of(logits, pooled, patches)


def _fit_head(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give the model as many classes as the state dict's head (a name builds 1000), before the strict load."""
    reset = getattr(model, "reset_classifier", None)
    head = getattr(model, "get_classifier", lambda: None)()
    if reset is None or head is None or not hasattr(head, "weight"):
        return sd
    name = next((k for k, v in model.state_dict().items() if v is head.weight), None)
    if name is not None and name in sd and sd[name].shape[0] != head.weight.shape[0]:
        reset(sd[name].shape[0])
    return sd


def build(side: Side, *, model: str | None = None, device: str = "cpu", like: Architecture | None = None) -> Runner:
    """timm's model for ``side`` (see the module's docstring), its weights loaded when they fit exactly;
    ``like`` (the original's architecture) is built again at the side's geometry instead of being read anew."""
    if side.family == "dinov2":
        raise GeometryError(
            f"{side.path} is in the DINOv2 repository's own layout, which no pip library builds; check the timm "
            f"or transformers version of the model instead"
        )
    if like is not None:
        arch = like
    elif model is not None:
        arch = Architecture("timm", model, {}, "--model")
    else:
        arch = _from_config(side) or (
            _infer_npz(side) if side.format == "npz" else _infer_vit(strip_prefix(side.state_dict, side.prefix), side)
        )
    return TimmRunner(side, arch, device)
