"""The images ``check`` runs the models on: the user's folder (any format Pillow reads, recursively), or the
photographs that scikit-image ships in its wheel (never downloaded), each whole and as its four quadrants."""

from __future__ import annotations

import functools
import importlib.util
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .base import require

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["SAMPLES", "Skipped", "folder_images", "sample_images"]

SAMPLES = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
)
"""The photographs of scikit-image's ``skimage/data`` folder that its wheel ships (no download)."""

MAX_DEPTH = 32
"""Folders deeper than this under ``--images`` are not walked (a loop of bind mounts would never end)."""


@dataclass(frozen=True)
class Skipped:
    """A file of the images folder that was not used, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "TGA", "ICO", "JPEG2000", "QOI")
"""The raster formats read from an images folder (never EPS/PS, which Pillow hands to Ghostscript)."""


def _open_rgb(path: Path, max_side: int | None = None) -> Image:
    """The image at ``path``, decoded whole (a truncated file fails here, not later) and in RGB; with
    ``max_side``, shrunk (aspect kept) to at most that, so that a folder of photographs costs little memory.
    A decompression bomb (over Pillow's pixel limit) is an error, not a warning."""
    import warnings

    pil = require("PIL.Image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", pil.DecompressionBombWarning)
        with pil.open(path, formats=FORMATS) as im:
            if max_side is not None:
                im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale
            im.load()
            rgb: Image = im.convert("RGB")
    if max_side is not None and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), pil.Resampling.BICUBIC)
    return rgb


def _walk(root: Path, depth: int, skipped: list[Skipped]) -> Iterator[Path]:
    """Regular files under ``root``, sorted, links and special files reported, never followed."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        skipped.append(Skipped(str(root), f"cannot list it: {e.strerror or e}"))
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as e:
            skipped.append(Skipped(str(path), f"cannot stat it: {e.strerror or e}"))
            continue
        if stat.S_ISLNK(st.st_mode):
            skipped.append(Skipped(str(path), "a symbolic link (not followed)"))
        elif entry.name.startswith("."):
            skipped.append(Skipped(str(path), "hidden (its name starts with a dot)"))
        elif stat.S_ISDIR(st.st_mode):
            if depth >= MAX_DEPTH:
                skipped.append(Skipped(str(path), f"deeper than {MAX_DEPTH} folders"))
            else:
                yield from _walk(path, depth + 1, skipped)
        elif stat.S_ISREG(st.st_mode):
            yield path
        else:
            skipped.append(Skipped(str(path), "not a regular file (a device, FIFO or socket)"))


def folder_images(
    root: Path, limit: int | None = None, *, max_side: int | None = None
) -> tuple[list[tuple[str, Image]], list[Skipped]]:
    """Every image Pillow reads under ``root`` (recursively, in path order, at most ``limit``), named by their
    path relative to ``root``, shrunk to at most ``max_side`` pixels a side; the files that are not images, or
    are broken, are skipped and reported (also hidden files: their names start with a dot).

    Raises:
        UsageError: ``root`` is not a folder, or holds no image Pillow reads.
    """
    pil = require("PIL.Image")
    if not root.is_dir():
        raise UsageError(f"--images {root} is not a folder; give a folder of images (any format Pillow reads)")
    images: list[tuple[str, Image]] = []
    skipped: list[Skipped] = []
    for path in _walk(root, 0, skipped):
        if limit is not None and len(images) >= limit:
            break
        try:
            images.append((str(path.relative_to(root)), _open_rgb(path, max_side)))
        except (OSError, ValueError, SyntaxError, pil.DecompressionBombError, pil.DecompressionBombWarning) as e:
            skipped.append(Skipped(str(path), f"not an image Pillow reads: {str(e).splitlines()[0] if str(e) else e}"))
    if not images:
        raise UsageError(
            f"--images {root} holds no image that Pillow reads"
            + (f" ({len(skipped)} file(s) skipped, e.g. {skipped[0].path}: {skipped[0].reason})" if skipped else "")
        )
    return images, skipped


def _quadrants(name: str, im: Image) -> list[tuple[str, Image]]:
    w, h = im.size
    boxes = {"top-left": (0, 0, w // 2, h // 2), "top-right": (w // 2, 0, w, h // 2)}
    boxes |= {"bottom-left": (0, h // 2, w // 2, h), "bottom-right": (w // 2, h // 2, w, h)}
    return [(name, im)] + [(f"{name} ({where})", im.crop(box)) for where, box in boxes.items()]


def sample_images(limit: int | None = None) -> list[tuple[str, Any]]:
    """scikit-image's photographs (:data:`SAMPLES`), each whole and as its four quadrants (80 images).

    Raises:
        MissingDependencyError: scikit-image (or Pillow) is not installed.
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        require("skimage", why="vitresize check without --images (its sample photographs)")
        raise AssertionError("unreachable")  # pragma: no cover
    images = _samples(Path(next(iter(spec.submodule_search_locations))) / "data")
    return list(images[:limit] if limit is not None else images)


@functools.lru_cache(maxsize=1)
def _samples(data: Path) -> tuple[tuple[str, Image], ...]:
    """The decoded photographs, once per process (``check --methods all`` and ``convert --check`` reuse them;
    nothing modifies them)."""
    images: list[tuple[str, Image]] = []
    for name in SAMPLES:
        images += _quadrants(name, _open_rgb(data / name))
    return tuple(images)
