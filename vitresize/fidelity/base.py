"""What ``check`` builds a model from, and what a built model gives back: the interface between the check and the
libraries' runners (:mod:`.timm`, :mod:`.hf`, :mod:`.open_clip`, :mod:`.torchvision`).

A runner builds the family's own model at a checkpoint's geometry (``timm.create_model``, a transformers class,
open_clip's vision tower, torchvision's ``VisionTransformer``), loads the state dict that vitresize read
(``weights_only``; a library never opens the file itself, .npz apart), preprocesses an image as that library
would, and returns the logits (when there is a head), the pooled features and the patch features.
Heavy imports (torch, the library) happen inside the functions.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MissingDependencyError

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

    from ..plans import Embedding
    from ..resample.geometry import Size

__all__ = [
    "Architecture",
    "LoadResult",
    "Outputs",
    "Runner",
    "Side",
    "library_of",
    "on_grid",
    "require",
    "standard_heads",
    "strict_load",
    "strip_prefix",
]

LIBRARIES = {
    "timm": "timm",
    "transformers": "transformers",
    "open_clip": "open_clip_torch",
    "torchvision": "torchvision",
}
"""Library (import name) -> the pip package that brings it."""


def library_of(family: str) -> str:
    """The library whose model a checkpoint of ``family`` (a key of :data:`vitresize.keymaps.KEYMAPS`) loads
    into: ``timm`` (timm's families, DINOv2's hub layout, JAX .npz through timm's loader), ``transformers``
    (``hf*``), ``open_clip`` or ``torchvision``."""
    if family.startswith("hf"):
        return "transformers"
    if family in ("open_clip", "torchvision"):
        return family
    return "timm"


def require(module: str, *, why: str = "vitresize check") -> Any:
    """Import ``module`` or raise :class:`MissingDependencyError` with the ``pip install`` that fixes it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".", 1)[0]
        package = {**LIBRARIES, "PIL": "pillow", "skimage": "scikit-image", "matplotlib": "matplotlib"}.get(top, top)
        extra = {"matplotlib": "plot", "skimage": "check", "PIL": "check"}.get(top)
        also = f' (or pip install "vitresize[{extra}]")' if extra else ""
        raise MissingDependencyError(
            f"{why} needs {top}, which is not installed ({e}); install it with: pip install {package}{also}"
        ) from None


@dataclass(frozen=True)
class Side:
    """One checkpoint to build a model for: what vitresize read of it.

    ``state_dict`` holds every tensor of the ViT's state dict (keys as in the file, ``embedding.key_prefix``
    included); ``config`` is the ``config.json`` beside the file or in the folder (``config_kind`` ``"hf"`` or
    ``"timm"``), or ``None``.
    """

    path: Path
    format: str
    embedding: Embedding
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    config_kind: str | None
    img_size: Size
    patch: Size
    grid: Size
    window: Size | None = None
    config_img_size: Size | None = None
    """The image size the config.json states (``None``: no config, or it states none)."""
    config_patch: Size | None = None

    @property
    def family(self) -> str:
        return self.embedding.family

    @property
    def prefix(self) -> str:
        """The key prefix the model's keys carry in the file (``module.``, ``visual.``, ...)."""
        return self.embedding.key_prefix


@dataclass(frozen=True)
class Architecture:
    """What was built: the library, the model's name there and the arguments apart from the geometry.

    ``source`` says where it came from: ``"config"`` (config.json), ``"--model"`` (the user named it) or
    ``"inferred"`` (read from the state dict's shapes; ``note`` says what was guessed, e.g. the head count).
    """

    library: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    source: str = "inferred"
    note: str = ""

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.args.items())
        text = f"{self.library} {self.name}" + (f"({args})" if args else "")
        return text + (f" [{self.source}; {self.note}]" if self.note else f" [{self.source}]")

    def to_dict(self) -> dict[str, Any]:
        return {
            "library": self.library,
            "name": self.name,
            "args": {
                k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v) for k, v in self.args.items()
            },
            "source": self.source,
            "note": self.note,
        }


def _jsonable(v: Any) -> Any:
    """An argument as JSON: scalars and lists (of lists) of scalars as they are, anything else as its repr."""
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return repr(v)


@dataclass(frozen=True)
class LoadResult:
    """How a state dict went into the built model: strict when all three lists are empty."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    """``"key: file [shape] vs model [shape]"``."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        if self.ok:
            return "strict load ok"
        parts = []
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("mismatched", self.mismatched)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {name}: {', '.join(keys[:3])}{more}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": list(self.mismatched),
        }


@dataclass
class Outputs:
    """A batch's outputs: ``logits`` ``[N, classes]`` (``None`` without a head), ``pooled`` ``[N, D]`` (the
    features the head reads, or the image embedding), ``patches`` ``[N, H, W, D]`` (the last layer's patch tokens
    on the model's grid, prefix tokens dropped), all float32 on the CPU."""

    logits: torch.Tensor | None
    pooled: torch.Tensor
    patches: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor | None, pooled: torch.Tensor, patches: torch.Tensor) -> Outputs:
        """The outputs as float32 on the CPU, wherever the model ran."""
        return cls(None if logits is None else logits.float().cpu(), pooled.float().cpu(), patches.float().cpu())


def on_grid(tokens: torch.Tensor, grid: Size) -> torch.Tensor:
    """The last ``H*W`` of ``[N, L, D]`` tokens (prefix tokens come first in every library) as ``[N, H, W, D]``;
    for a hierarchical model (Swin), whose last stage has fewer tokens, on that stage's grid (halved, rounded up,
    per merge)."""
    n, length, d = tokens.shape
    h, w = grid
    while h * w > length and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w > length:
        from ..errors import InternalError

        raise InternalError(f"{length} tokens do not hold the {grid[0]}x{grid[1]} grid")
    return tokens[:, length - h * w :].reshape(n, h, w, d)


class Runner(ABC):
    """A library's model built for one :class:`Side`, its state dict loaded, in eval mode on ``device``."""

    architecture: Architecture
    load: LoadResult
    input_size: Size
    """The image size the model takes, ``(height, width)``."""
    transform: Callable[[Image], torch.Tensor]
    """The library's eval transform (used by the default :meth:`preprocess`)."""
    device: str
    grid: Size
    model: Any

    def _adopt(self, side: Side, arch: Architecture, model: torch.nn.Module, device: str) -> None:
        """What every runner sets: the architecture, the side's input size and grid, ``model`` with the side's
        state dict loaded strictly (its own prefix stripped), moved to ``device``."""
        self.architecture, self.device, self.input_size, self.grid = arch, device, side.img_size, side.grid
        self.model = model
        self.load = strict_load(model, strip_prefix(side.state_dict, side.prefix))
        model.to(device)

    def preprocess(self, image: Image) -> torch.Tensor:
        """An RGB PIL image to the model's input ``[3, H, W]``, as the library's own eval transform does it
        (resize, centre crop, normalize)."""
        return self.transform(image)

    @abstractmethod
    def forward(self, batch: torch.Tensor) -> Outputs:
        """Run the model on ``[N, 3, H, W]`` under ``torch.inference_mode()``."""


def strict_load(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> LoadResult:
    """Load ``state_dict`` into ``model`` when it fits exactly (as ``load_state_dict(strict=True)``), and say
    what does not fit otherwise (nothing is loaded then). Persistent buffers count; non-persistent ones do not."""
    expected = model.state_dict()
    missing = tuple(k for k in expected if k not in state_dict)
    unexpected = tuple(k for k in state_dict if k not in expected)
    mismatched = tuple(
        f"{k}: file {list(v.shape)} vs model {list(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    result = LoadResult(missing, unexpected, mismatched)
    if result.ok:
        model.load_state_dict(state_dict, strict=True)
    return result


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, with it removed (the whole dict when ``prefix`` is empty)."""
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


STANDARD_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1152: 16, 1280: 16, 1408: 16, 1536: 24, 1664: 16}
"""Width -> attention heads of the standard ViT sizes (Ti, S, M, B, L, SO400M, H, g, DINOv2 g, bigG): the
weights do not say the head count (``qkv`` is ``[3 * width, width]`` for any)."""


def standard_heads(width: int) -> tuple[int, str]:
    """The head count of a ViT of ``width``, and a note when it is a guess (a width outside the table: one
    head per 64 channels, at least one, dividing the width)."""
    if width in STANDARD_HEADS:
        return STANDARD_HEADS[width], ""
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads, f"{heads} head(s) guessed for width {width} (pass --model or a config.json to be sure)"
