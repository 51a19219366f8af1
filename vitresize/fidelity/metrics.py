"""How closely two models agree on the same images: top-1 agreement and top-5 overlap of the classifiers, the
KL divergence of their predictions, and the cosine similarity of their pooled and patch features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .base import Outputs

__all__ = ["ImageScores", "Scores", "aggregate", "compare"]


@dataclass(frozen=True)
class ImageScores:
    """One image: the two top-1 classes (``None`` without a head), the KL divergence of the second model's
    prediction from the first's (nats), the top-5 overlap (0..1) and the cosine similarities."""

    image: str
    top1: tuple[int, int] | None
    top5_overlap: float | None
    kl: float | None
    cosine_pooled: float
    cosine_patch: float

    @property
    def agree(self) -> bool | None:
        return None if self.top1 is None else self.top1[0] == self.top1[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "top1": None if self.top1 is None else list(self.top1),
            "agree": self.agree,
            "top5_overlap": self.top5_overlap,
            "kl": self.kl,
            "cosine_pooled": self.cosine_pooled,
            "cosine_patch": self.cosine_patch,
        }


@dataclass(frozen=True)
class Scores:
    """Aggregated over the images: agreement and overlap in percent, mean KL, mean cosines."""

    images: int
    top1_agreement: float | None
    top5_overlap: float | None
    kl: float | None
    cosine_pooled: float
    cosine_patch: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "top1_agreement": self.top1_agreement,
            "top5_overlap": self.top5_overlap,
            "kl": self.kl,
            "cosine_pooled": self.cosine_pooled,
            "cosine_patch": self.cosine_patch,
        }


def _resize_grid(patches: Any, grid: tuple[int, int]) -> Any:
    """``[N, h, w, D]`` features resampled to ``grid`` (bilinear, antialiased when shrinking)."""
    import torch.nn.functional as F

    if tuple(patches.shape[1:3]) == grid:
        return patches
    x = patches.permute(0, 3, 1, 2)
    shrink = grid[0] < x.shape[-2] or grid[1] < x.shape[-1]
    x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False, antialias=shrink)
    return x.permute(0, 2, 3, 1)


def compare(names: Sequence[str], a: Outputs, b: Outputs) -> list[ImageScores]:
    """Per-image scores of ``b`` (a converted model) against ``a`` (the original), for one batch. The patch
    features of ``b`` are resampled to ``a``'s grid first."""
    import torch
    import torch.nn.functional as F

    cos_pooled = F.cosine_similarity(a.pooled, b.pooled, dim=-1) if a.pooled.shape == b.pooled.shape else None
    pb = _resize_grid(b.patches, (a.patches.shape[1], a.patches.shape[2]))
    cos_patch = (
        F.cosine_similarity(a.patches, pb, dim=-1).mean(dim=(1, 2)) if a.patches.shape[-1] == pb.shape[-1] else None
    )
    top1 = top5 = kl = None
    if a.logits is not None and b.logits is not None and a.logits.shape == b.logits.shape:
        top1 = (a.logits.argmax(-1), b.logits.argmax(-1))
        k = min(5, a.logits.shape[-1])
        ta, tb = a.logits.topk(k, dim=-1).indices, b.logits.topk(k, dim=-1).indices
        top5 = (ta.unsqueeze(-1) == tb.unsqueeze(-2)).any(-1).float().mean(-1)
        la, lb = a.logits.log_softmax(-1), b.logits.log_softmax(-1)
        kl = (la.exp() * (la - lb)).sum(-1).clamp_min(0)
    nan = torch.full((len(names),), float("nan"))
    cp = cos_pooled if cos_pooled is not None else nan
    cq = cos_patch if cos_patch is not None else nan
    return [
        ImageScores(
            image=name,
            top1=None if top1 is None else (int(top1[0][i]), int(top1[1][i])),
            top5_overlap=None if top5 is None else float(top5[i]),
            kl=None if kl is None else float(kl[i]),
            cosine_pooled=float(cp[i]),
            cosine_patch=float(cq[i]),
        )
        for i, name in enumerate(names)
    ]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def aggregate(scores: Sequence[ImageScores]) -> Scores:
    """The images' scores summed up (percentages for top-1 agreement and top-5 overlap)."""
    heads = [s for s in scores if s.top1 is not None]
    return Scores(
        images=len(scores),
        top1_agreement=100 * _mean([float(bool(s.agree)) for s in heads]) if heads else None,
        top5_overlap=100 * _mean([s.top5_overlap or 0.0 for s in heads]) if heads else None,
        kl=_mean([s.kl or 0.0 for s in heads]) if heads else None,
        cosine_pooled=_mean([s.cosine_pooled for s in scores]),
        cosine_patch=_mean([s.cosine_patch for s in scores]),
    )
