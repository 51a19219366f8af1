"""The torchvision runner of ``check``: ``torchvision.models.vision_transformer.VisionTransformer``.

The architecture comes from ``--model`` (a torchvision builder, ``vit_b_16`` ..., built with
``torchvision.models.get_model(name, weights=None, image_size=H)``, or with that builder's widths and the
checkpoint's patch where the patch differs) or from the state dict's shapes (layers, width, MLP size, classes,
``representation_size``; the head count by :func:`~.base.standard_heads`). torchvision's ViT takes square images
and patches only. Images are preprocessed by torchvision's eval preset ``ImageClassification`` (crop ``H``, resize
``round(H * 256 / 224)``, as ``vit_b_16``'s weights do at 224).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, cast

from ..errors import GeometryError, InternalError, UsageError, param
from .base import Architecture, Outputs, Runner, Side, on_grid, require, standard_heads, strip_prefix

if TYPE_CHECKING:
    import torch

__all__ = ["build"]

_LAYER = re.compile(r"encoder\.layers\.encoder_layer_(\d+)\.")
_MLP = "encoder.layers.encoder_layer_0.mlp.0.weight"
_WIDTHS = ("num_layers", "num_heads", "hidden_dim", "mlp_dim")
_BUILDERS: dict[str, tuple[int, int, int, int, int]] = {
    # name -> patch_size, num_layers, num_heads, hidden_dim, mlp_dim (as torchvision's builders pass them)
    "vit_b_16": (16, 12, 12, 768, 3072),
    "vit_b_32": (32, 12, 12, 768, 3072),
    "vit_l_16": (16, 24, 16, 1024, 4096),
    "vit_l_32": (32, 24, 16, 1024, 4096),
    "vit_h_14": (14, 32, 16, 1280, 5120),
}


def _geometry(side: Side) -> tuple[int, int]:
    """The side's (square) image size and patch, as torchvision takes them."""
    (h, w), (ph, pw) = side.img_size, side.patch
    if h != w or ph != pw:
        raise GeometryError(
            f"{side.path} is {h}x{w} with patch {ph}x{pw}, but torchvision's VisionTransformer takes a square image "
            f"size and patch; convert it to a square size (--img-size N) to check it"
        )
    if h % ph:
        raise GeometryError(
            f"{side.path}: torchvision's VisionTransformer needs an image size divisible by the patch ({h} by {ph}); "
            f"convert it to a multiple of {ph} to check it"
        )
    return h, ph


def _heads(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """The classifier arguments the state dict's ``heads`` imply (none without a head)."""
    if "heads.head.weight" not in sd:
        return {}
    args = {"num_classes": int(sd["heads.head.weight"].shape[0])}
    if "heads.pre_logits.weight" in sd:
        args["representation_size"] = int(sd["heads.pre_logits.weight"].shape[0])
    return args


def _infer(side: Side, sd: dict[str, torch.Tensor]) -> Architecture:
    """A ``VisionTransformer`` from the state dict's shapes."""
    layers = {int(m.group(1)) for k in sd if (m := _LAYER.match(k))}
    if not layers or "conv_proj.weight" not in sd or _MLP not in sd:
        raise GeometryError(
            f"cannot tell the architecture of {side.path} from its weights (not a plain torchvision "
            f"VisionTransformer); pass {param('model')} NAME (a torchvision builder, e.g. vit_b_16)"
        )
    width = int(sd["conv_proj.weight"].shape[0])
    heads, note = standard_heads(width)
    args: dict[str, Any] = {
        "num_layers": max(layers) + 1,
        "num_heads": heads,
        "hidden_dim": width,
        "mlp_dim": int(sd[_MLP].shape[0]),
        **_heads(sd),
    }
    return Architecture("torchvision", "VisionTransformer", args, "inferred", note)


def _named(name: str, side: Side, sd: dict[str, torch.Tensor]) -> Architecture:
    """The arguments of torchvision's builder ``name`` (its widths; the classes the weights have)."""
    tv = require("torchvision.models")
    image, patch = _geometry(side)
    if name in _BUILDERS:
        built_patch, *widths = _BUILDERS[name]
        args: dict[str, Any] = dict(zip(_WIDTHS, widths, strict=True))
    else:
        try:
            vit = tv.get_model(name, weights=None, image_size=image, **_heads(sd))
        except (ValueError, TypeError, RuntimeError) as e:
            raise UsageError(
                f"{param('model')} {name!r} is not a torchvision ViT builder "
                f"({str(e).splitlines()[0] if str(e) else e!r}); pass one of {', '.join(_BUILDERS)}"
            ) from None
        except AssertionError as e:  # torch._assert: the builder's patch does not divide the image size
            raise GeometryError(
                f"{param('model')} {name!r} cannot be built at {image}x{image} ({e}); pass a builder whose patch "
                f"divides {image}, or one of {', '.join(_BUILDERS)}"
            ) from None
        if not isinstance(vit, require("torchvision.models.vision_transformer").VisionTransformer):
            raise UsageError(f"--model {name!r} is not a torchvision ViT builder; pass one of {', '.join(_BUILDERS)}")
        built_patch = vit.patch_size
        layer = vit.encoder.layers[0]
        args = {
            "num_layers": len(vit.encoder.layers),
            "num_heads": layer.num_heads,
            "hidden_dim": vit.hidden_dim,
            "mlp_dim": vit.mlp_dim,
        }
    args.update(_heads(sd))
    note = "" if built_patch == patch else f"{name}'s widths with patch {patch} (it builds patch {built_patch})"
    return Architecture("torchvision", name, args, "--model", note)


def _model(arch: Architecture, side: Side) -> torch.nn.Module:
    """torchvision's ``VisionTransformer`` of ``arch`` at the side's geometry (no classifier: ``heads`` is an
    identity when the weights have none)."""
    import torch

    vt = require("torchvision.models.vision_transformer")
    image, patch = _geometry(side)
    model = vt.VisionTransformer(image_size=image, patch_size=patch, **arch.args)
    if "num_classes" not in arch.args:
        model.heads = torch.nn.Identity()
    return model.eval()  # type: ignore[no-any-return]


class _TorchvisionRunner(Runner):
    def __init__(self, side: Side, arch: Architecture, device: str) -> None:
        presets = require("torchvision.transforms._presets")
        self._adopt(side, arch, _model(arch, side), device)
        h = side.img_size[0]
        self.transform = presets.ImageClassification(crop_size=h, resize_size=round(h * 256 / 224))
        self._tokens: torch.Tensor | None = None
        cast("torch.nn.Module", self.model.encoder).register_forward_hook(self._keep)

    def _keep(self, module: Any, args: Any, out: torch.Tensor) -> None:
        self._tokens = out

    def forward(self, batch: torch.Tensor) -> Outputs:
        import torch

        with torch.inference_mode():
            logits = self.model(batch.to(self.device))
            tokens, self._tokens = self._tokens, None
            if tokens is None:
                raise InternalError("torchvision's encoder hook did not run in the forward pass")
        has_head = "num_classes" in self.architecture.args
        return Outputs.of(logits if has_head else None, tokens[:, 0], on_grid(tokens, self.grid))


def build(side: Side, *, model: str | None = None, device: str = "cpu") -> Runner:
    """torchvision's ``VisionTransformer`` for ``side`` (see the module's docstring), its weights loaded when they
    fit exactly.

    Args:
        side: a ``torchvision`` checkpoint.
        model: a torchvision builder name (``--model``, e.g. ``vit_b_16``), or ``None`` to infer the model.
        device: where the model runs.

    Raises:
        GeometryError: the side is not square (or not a multiple of its patch), or its architecture cannot be
            told from the weights.
        UsageError: ``model`` is not a torchvision ViT builder.
        MissingDependencyError: torchvision is not installed.
    """
    require("torchvision")
    _geometry(side)
    sd = strip_prefix(side.state_dict, side.prefix)
    arch = _named(model, side, sd) if model is not None else _infer(side, sd)
    return _TorchvisionRunner(side, arch, device)
