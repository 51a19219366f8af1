"""The open_clip runner of ``check``: the vision tower of an open_clip (or OpenAI CLIP) state dict.

Only the tower is built (``open_clip.model._build_vision_tower``) and strictly loaded with the ``visual.`` keys;
the text tower is not part of the check. The architecture comes from ``--model`` (an open_clip model name, or
``local-dir:PATH`` of a folder with ``open_clip_config.json``) or from the state dict's shapes (width, layers,
MLP ratio, output dim, layer scale, ``ln_pre``; the head count by :func:`~.base.standard_heads`; GELU, not
OpenAI's QuickGELU, which the weights do not tell). Images are preprocessed as
``open_clip.create_model_and_transforms`` does for eval: ``image_transform`` at the input size with OpenAI's
mean and std (or a ``local-dir`` config's ``preprocess_cfg``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..errors import GeometryError, UsageError, param
from .base import Architecture, Outputs, Runner, Side, on_grid, require, standard_heads, strip_prefix

if TYPE_CHECKING:
    import torch

    from ..resample.geometry import Size

__all__ = ["build"]

_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")
_LOCAL = "local-dir:"
_QUICK_GELU = "GELU assumed (OpenAI's weights use QuickGELU: pass --model NAME-quickgelu for them)"


def _size(s: Size) -> int | tuple[int, int]:
    return s[0] if s[0] == s[1] else (s[0], s[1])


def _cannot_tell(side: Side, why: str) -> GeometryError:
    return GeometryError(
        f"cannot tell the architecture of {side.path} from its weights ({why}); pass {param('model')} NAME "
        f"(an open_clip model name, e.g. ViT-B-16 or ViT-L-14-quickgelu)"
    )


def _mlp_ratio(hidden: int, width: int) -> float:
    """A ratio that open_clip's ``int(width * mlp_ratio)`` turns back into ``hidden``."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _infer(side: Side, sd: dict[str, torch.Tensor]) -> tuple[Architecture, dict[str, Any]]:
    """The model config (``embed_dim``, ``vision_cfg``) of a plain open_clip ``VisionTransformer`` tower."""
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    needed = ("conv1.weight", "proj", "transformer.resblocks.0.mlp.c_fc.weight")
    if not blocks or any(k not in sd for k in needed):
        raise _cannot_tell(side, "not a plain open_clip VisionTransformer tower")
    if any(k.startswith("attn_pool") for k in sd):
        raise _cannot_tell(side, "an attentional pooler, as in CoCa")
    width = int(sd["conv1.weight"].shape[0])
    heads, note = standard_heads(width)
    vision: dict[str, Any] = {
        "layers": max(blocks) + 1,
        "width": width,
        "head_width": width // heads,
        "mlp_ratio": _mlp_ratio(int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]), width),
    }
    if "transformer.resblocks.0.ls_1.gamma" in sd:
        vision["ls_init_value"] = 1e-5  # any value: the weights overwrite it
    if "ln_pre.weight" not in sd:
        vision["no_ln_pre"] = True
    cfg = {"embed_dim": int(sd["proj"].shape[1]), "vision_cfg": vision, "quick_gelu": False}
    args = {"embed_dim": cfg["embed_dim"], **vision}
    return Architecture(
        "open_clip", "VisionTransformer", args, "inferred", "; ".join(filter(None, [note, _QUICK_GELU]))
    ), cfg


def _named(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model config and preprocess config of an open_clip model name (never fetched from the hub)."""
    oc = require("open_clip")
    if name.startswith("hf-hub:"):
        raise UsageError(
            f"{param('model')} {name!r} would download a config from the Hugging Face hub; download the repository and "
            f"pass {param('model')} {_LOCAL}PATH, or an open_clip model name (open_clip.list_models())"
        )
    preprocess: dict[str, Any] = {}
    if name.startswith(_LOCAL):
        path = Path(name[len(_LOCAL) :]) / "open_clip_config.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"--model {name!r}: cannot read {path} ({e}); pass a folder with that file") from None
        cfg = data.get("model_cfg", data) if isinstance(data, dict) else None
        found = data.get("preprocess_cfg") if isinstance(data, dict) else None
        preprocess = found if isinstance(found, dict) else {}
    else:
        cfg = oc.get_model_config(name.replace("/", "-"))
    if not isinstance(cfg, dict) or not isinstance(cfg.get("vision_cfg"), dict) or "embed_dim" not in cfg:
        raise UsageError(
            f"{param('model')} {name!r} is not an open_clip model name; see open_clip.list_models() (e.g. ViT-B-16)"
        )
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)):
        raise UsageError(
            f"{param('model')} {name!r} has a timm or ResNet image tower, not open_clip's VisionTransformer; "
            f"pass a ViT model name (e.g. ViT-B-16)"
        )
    return cfg, preprocess


def _tower(cfg: dict[str, Any], side: Side) -> torch.nn.Module:
    """open_clip's vision tower of ``cfg`` at the side's geometry, returning its tokens too."""
    model = require("open_clip.model")
    vision = {**cfg["vision_cfg"], "image_size": _size(side.img_size), "patch_size": _size(side.patch)}
    vision["output_tokens"] = True
    tower = model._build_vision_tower(cfg["embed_dim"], vision, quick_gelu=bool(cfg.get("quick_gelu", False)))
    return tower.eval()  # type: ignore[no-any-return]


class _OpenClipRunner(Runner):
    def __init__(self, side: Side, arch: Architecture, cfg: dict[str, Any], preprocess: dict[str, Any], device: str):
        transform = require("open_clip.transform")
        self._adopt(side, arch, _tower(cfg, side), device)
        pp = {**dataclasses.asdict(transform.PreprocessCfg()), **preprocess}
        self.transform = transform.image_transform(
            side.img_size,
            is_train=False,
            mean=pp["mean"],
            std=pp["std"],
            resize_mode=pp["resize_mode"],
            interpolation=pp["interpolation"],
            fill_color=pp["fill_color"],
        )
        self._last: torch.Tensor | None = None
        if getattr(self.model, "attn_pool", None) is not None:  # its tokens are the pooler's queries
            cast("torch.nn.Module", self.model.transformer).register_forward_hook(self._keep)

    def _keep(self, module: Any, args: Any, out: torch.Tensor) -> None:
        self._last = out

    def forward(self, batch: torch.Tensor) -> Outputs:
        import torch

        with torch.inference_mode():
            pooled, tokens = self.model(batch.to(self.device))
            if self._last is not None:  # an attentional pooler: the last block's tokens
                tokens, self._last = self._last, None
        return Outputs.of(None, pooled, on_grid(tokens, self.grid))


def build(side: Side, *, model: str | None = None, device: str = "cpu") -> Runner:
    """open_clip's vision tower for ``side`` (see the module's docstring), its weights loaded when they fit.

    Args:
        side: an ``open_clip`` checkpoint (its ``visual.`` tensors are the tower's).
        model: an open_clip model name (``--model``), or ``None`` to infer the tower from the weights.
        device: where the tower runs.

    Raises:
        GeometryError: the architecture cannot be told from the weights.
        UsageError: ``model`` is not an open_clip ViT model name.
        MissingDependencyError: open_clip is not installed.
    """
    require("open_clip")
    preprocess: dict[str, Any] = {}
    if model is not None:
        cfg, preprocess = _named(model)
        vision = {k: v for k, v in cfg["vision_cfg"].items() if k not in ("image_size", "patch_size")}
        args = {"embed_dim": cfg["embed_dim"], **vision, "quick_gelu": bool(cfg.get("quick_gelu", False))}
        arch = Architecture("open_clip", model, args, "--model")
    else:
        arch, cfg = _infer(side, strip_prefix(side.state_dict, side.prefix))
    return _OpenClipRunner(side, arch, cfg, preprocess, device)
