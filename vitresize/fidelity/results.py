"""What ``check`` found (:class:`CheckReport`): frozen dataclasses with ``to_dict()`` for ``--json``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..plans import size_list
from ..report import JSON_SCHEMA_VERSION

if TYPE_CHECKING:
    from ..resample.geometry import Size
    from .base import Architecture, LoadResult
    from .images import Skipped
    from .metrics import ImageScores, Scores

__all__ = ["COSINE_MARGIN", "TOP1_MARGIN", "Candidate", "CheckReport", "Gate", "SideReport"]

COSINE_MARGIN = 0.05
"""The default gate: CONVERTED's mean cosine similarity (pooled and patch features) to the original may be at
most this much lower than the reference conversion's."""
TOP1_MARGIN = 5.0
"""The default gate: CONVERTED's top-1 agreement with the original may be at most this many points lower than
the reference conversion's."""


def _num(x: float | None) -> float | None:
    """A JSON number: NaN (a metric that could not be computed) is ``null``."""
    return None if x is None or math.isnan(x) else x


@dataclass(frozen=True)
class SideReport:
    """One of the two checkpoints: where it is, what was built for it and how its weights went in."""

    path: Path
    family: str
    architecture: Architecture
    load: LoadResult
    img_size: Size
    patch: Size
    grid: Size
    window: Size | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "family": self.family,
            "architecture": self.architecture.to_dict(),
            "load": self.load.to_dict(),
            "img_size": size_list(self.img_size),
            "patch": size_list(self.patch),
            "grid": size_list(self.grid),
            "window": size_list(self.window),
        }


@dataclass(frozen=True)
class Candidate:
    """A conversion compared with the original: the user's CONVERTED (``method`` ``None``), the reference
    (vitresize's default), or one method of ``--methods``. ``scores`` is ``None`` when it could not be made
    (``note`` says why)."""

    name: str
    method: str | None
    patch_method: str | None
    scores: Scores | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        s = self.scores
        return {
            "name": self.name,
            "method": self.method,
            "patch_method": self.patch_method,
            "scores": None
            if s is None
            else {k: _num(v) if isinstance(v, float) else v for k, v in s.to_dict().items()},
            "note": self.note,
        }


@dataclass(frozen=True)
class Gate:
    """One pass/fail test of CONVERTED: ``value`` must be at least ``threshold``."""

    name: str
    value: float | None
    threshold: float
    ok: bool
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": _num(self.value),
            "threshold": self.threshold,
            "ok": self.ok,
            "text": self.text,
        }


@dataclass(frozen=True)
class CheckReport:
    """What :func:`vitresize.check` found. ``ok`` is the verdict: both strict loads and every gate hold."""

    original: SideReport
    converted: SideReport
    image_source: str
    images: int
    skipped: tuple[Skipped, ...]
    candidates: tuple[Candidate, ...]
    """CONVERTED first, then the reference, then the ``--methods`` ranked best first."""
    per_image: tuple[ImageScores, ...]
    """CONVERTED's scores on each image."""
    gates: tuple[Gate, ...]
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.original.load.ok and self.converted.load.ok and all(g.ok for g in self.gates)

    @property
    def converted_scores(self) -> Scores | None:
        return self.candidates[0].scores if self.candidates else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": JSON_SCHEMA_VERSION,
            "command": "check",
            "ok": self.ok,
            "original": self.original.to_dict(),
            "converted": self.converted.to_dict(),
            "images": {
                "source": self.image_source,
                "count": self.images,
                "skipped": [s.to_dict() for s in self.skipped],
            },
            "candidates": [c.to_dict() for c in self.candidates],
            "gates": [g.to_dict() for g in self.gates],
            "per_image": [
                {k: _num(v) if isinstance(v, float) else v for k, v in s.to_dict().items()} for s in self.per_image
            ],
            "warnings": list(self.warnings),
        }
