"""``vitresize check``: build the original and the converted checkpoint with their library, load both strictly,
run both on the same images, and compare them, against a reference conversion made in memory by vitresize's
default method (and, on request, by every method)."""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..api import _check_device
from ..errors import UsageError, VitresizeError, param
from ..options import Options, Target
from ..resample.conventions import METHODS
from ..resample.geometry import format_size
from .base import Outputs, Runner, Side, library_of, require
from .images import Skipped, folder_images, sample_images
from .metrics import ImageScores, Scores, aggregate, compare
from .results import COSINE_MARGIN, TOP1_MARGIN, Candidate, CheckReport, Gate, SideReport
from .sides import convert_side, read_side

if TYPE_CHECKING:
    from ..options import Family

__all__ = ["RUNNERS", "check"]

RUNNERS = {
    "timm": "vitresize.fidelity.lib_timm",
    "transformers": "vitresize.fidelity.lib_hf",
    "open_clip": "vitresize.fidelity.lib_open_clip",
    "torchvision": "vitresize.fidelity.lib_torchvision",
}
"""Library -> the module whose ``build(side, *, model, device)`` makes its :class:`~.base.Runner`."""

BATCH = 16


def _runner(side: Side, model: str | None, device: str) -> Runner:
    library = library_of(side.family)
    require(library if library != "open_clip" else "open_clip")
    build: Callable[..., Runner] = importlib.import_module(RUNNERS[library]).build
    return build(side, model=model, device=device)


def _side_report(side: Side, runner: Runner) -> SideReport:
    return SideReport(
        path=side.path,
        family=side.family,
        architecture=runner.architecture,
        load=runner.load,
        img_size=side.img_size,
        patch=side.patch,
        grid=side.grid,
        window=side.window,
    )


def _target_of(original: Side, converted: Side) -> Target:
    """The target that moves ``original`` to ``converted``'s geometry."""
    patch = converted.patch if converted.patch != original.patch and original.embedding.stem is None else None
    window = converted.window if converted.window != original.window else None
    if converted.grid == original.grid and patch is None and window is None:
        return Target(grid=original.grid)  # the identity: nothing to change
    return Target(grid=converted.grid, patch=patch, window=window)


def _outputs(runner: Runner, batches: Sequence[Sequence[Any]], tick: Callable[[int], None]) -> list[Outputs]:
    import torch

    out = []
    for batch in batches:
        out.append(runner.forward(torch.stack([runner.preprocess(im) for im in batch])))
        tick(len(batch))
    return out


def _score(
    runner: Runner,
    names: Sequence[Sequence[str]],
    batches: Sequence[Sequence[Any]],
    reference: Sequence[Outputs],
    tick: Callable[[int], None],
) -> list[ImageScores]:
    import torch

    scores: list[ImageScores] = []
    for n, batch, ref in zip(names, batches, reference, strict=True):
        out = runner.forward(torch.stack([runner.preprocess(im) for im in batch]))
        scores += compare(n, ref, out)
        tick(len(batch))
    return scores


def _gates(conv: Scores, ref: Scores, min_agreement: float | None, min_cosine: float | None) -> list[Gate]:
    gates = []
    for name, what in (("cosine_pooled", "pooled-feature cosine"), ("cosine_patch", "patch-feature cosine")):
        value, base = getattr(conv, name), getattr(ref, name)
        threshold = round(base - COSINE_MARGIN, 6)
        gates.append(
            Gate(
                f"{name} vs reference",
                value,
                threshold,
                value >= threshold,
                f"{what} {value:.4f}, needs >= {threshold:.4f} (the reference's {base:.4f} - {COSINE_MARGIN})",
            )
        )
    if conv.top1_agreement is not None and ref.top1_agreement is not None:
        threshold = round(ref.top1_agreement - TOP1_MARGIN, 6)
        gates.append(
            Gate(
                "top1_agreement vs reference",
                conv.top1_agreement,
                threshold,
                conv.top1_agreement >= threshold,
                f"top-1 agreement {conv.top1_agreement:.1f}%, needs >= {threshold:.1f}% (the reference's "
                f"{ref.top1_agreement:.1f}% - {TOP1_MARGIN:g} points)",
            )
        )
    if min_agreement is not None:
        value = conv.top1_agreement
        gates.append(
            Gate(
                "min_agreement",
                value,
                min_agreement,
                value is not None and value >= min_agreement,
                f"top-1 agreement {'n/a (no classifier head)' if value is None else f'{value:.1f}%'}, "
                f"needs >= {min_agreement:g}% (--min-agreement)",
            )
        )
    if min_cosine is not None:
        gates.append(
            Gate(
                "min_cosine",
                conv.cosine_pooled,
                min_cosine,
                conv.cosine_pooled >= min_cosine,
                f"pooled-feature cosine {conv.cosine_pooled:.4f}, needs >= {min_cosine:g} (--min-cosine)",
            )
        )
    return gates


def _methods(chosen: str | Sequence[str], patch_changes: bool) -> list[tuple[str, str]]:
    """``(method, patch_method)`` pairs to compare: ``"all"`` is every method (and both patch methods where the
    patch changes), ``"default"`` none beyond the reference."""
    if chosen == "default":
        return []
    names = list(METHODS) if chosen == "all" else list(chosen)
    for n in names:
        if n not in METHODS and n != "native":
            raise UsageError(f"{param('methods')} {n!r} is not a method; choose from all, {', '.join(METHODS)}")
    pairs = [(n, "pi") for n in names]
    if patch_changes:
        pairs += [("native", "interp")]
    return pairs


def _rank_key(c: Candidate) -> tuple[float, float, float]:
    s = c.scores
    if s is None:
        return (float("inf"),) * 3
    return (-(s.top1_agreement or 0.0), -s.cosine_pooled, -s.cosine_patch)


def check(
    original: str | os.PathLike[str],
    converted: str | os.PathLike[str],
    *,
    model: str | None = None,
    images: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    methods: str | Sequence[str] = "default",
    device: str = "cpu",
    min_agreement: float | None = None,
    min_cosine: float | None = None,
    family: Family = "auto",
    from_img_size: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Prove that ``converted`` still works: build both with their library, load both strictly, and compare
    them on the same images with a reference conversion of ``original`` made in memory.

    Args:
        original: the checkpoint before conversion (file or model folder).
        converted: the converted checkpoint (made by vitresize or any other tool).
        model: the model's name in its library (timm / open_clip / torchvision name, transformers class),
            when neither a config.json nor the weights tell the architecture.
        images: a folder of images (recursively, any format Pillow reads); default: scikit-image's photographs.
        limit: use at most this many images.
        methods: ``"default"`` (the reference only), ``"all"`` (every method, ranked), or method names.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        min_agreement: an absolute gate on the top-1 agreement, in percent.
        min_cosine: an absolute gate on the pooled-feature cosine similarity.
        family: the checkpoints' family (``auto``: from the key names).
        from_img_size: the original's image size, where its weights cannot tell it.
        progress: called as ``progress(images_done, images_total)``.

    Returns:
        A :class:`CheckReport`; ``report.ok`` is the verdict.

    Raises:
        MissingDependencyError: the model library, Pillow or scikit-image (default images) is not installed.
        UsageError: bad options, or the two checkpoints are not of one family.
        VitresizeError: a checkpoint cannot be read, or its architecture cannot be told.
    """
    _check_device(device)
    if limit is not None and limit < 1:
        raise UsageError(f"{param('limit')} must be at least 1, not {limit}")
    orig = read_side(original, family=family, from_img_size=from_img_size)
    conv = read_side(converted, family=family)
    if library_of(orig.family) != library_of(conv.family):
        raise UsageError(
            f"{original} is a {orig.family} checkpoint but {converted} is a {conv.family} one; check compares a "
            f"checkpoint with its own conversion"
        )
    if images is not None:
        pictures, skipped = folder_images(Path(images), limit)
        source = f"folder {images}"
    else:
        pictures, skipped = sample_images(limit), []
        source = "scikit-image sample photographs (whole and quadrants)"
    names = [[n for n, _ in pictures[i : i + BATCH]] for i in range(0, len(pictures), BATCH)]
    batches = [[im for _, im in pictures[i : i + BATCH]] for i in range(0, len(pictures), BATCH)]
    pairs = _methods(methods, conv.patch != orig.patch)
    total = len(pictures) * (3 + len(pairs))
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    runner_o = _runner(orig, model, device)
    runner_c = _runner(conv, model, device)
    report = CheckReport(
        original=_side_report(orig, runner_o),
        converted=_side_report(conv, runner_c),
        image_source=source,
        images=len(pictures),
        skipped=tuple(skipped),
        candidates=(),
        per_image=(),
        gates=(),
    )
    if not (runner_o.load.ok and runner_c.load.ok):
        return report
    warnings = []
    if runner_o.architecture.note:
        warnings.append(runner_o.architecture.note)
    base = _outputs(runner_o, batches, tick)
    per_image = _score(runner_c, names, batches, base, tick)
    del runner_c
    target = _target_of(orig, conv)
    reference_method = Options(device=device)
    ref_side = convert_side(orig, target, reference_method)
    ref_scores = aggregate(_score(_runner(ref_side, model, device), names, batches, base, tick))
    conv_scores = aggregate(per_image)
    candidates = [
        Candidate("converted", None, None, conv_scores),
        Candidate("reference", "native", "pi", ref_scores),
    ]
    ranked = []
    for method, patch_method in pairs:
        name = method if patch_method == "pi" else f"{method} (patch {patch_method})"
        try:
            side = convert_side(orig, target, Options(method=method, patch_method=patch_method, device=device))  # type: ignore[arg-type]
        except VitresizeError as e:
            ranked.append(Candidate(name, method, patch_method, None, str(e)))
            tick(len(pictures))
            continue
        scores = aggregate(_score(_runner(side, model, device), names, batches, base, tick))
        ranked.append(Candidate(name, method, patch_method, scores))
    ranked.sort(key=_rank_key)
    candidates += ranked
    if target.grid == orig.grid and target.patch is None and target.window is None:
        warnings.append(
            f"{converted} has the original's geometry ({format_size(orig.grid)} grid, patch "
            f"{format_size(orig.patch)}): the reference is the original itself"
        )
    return dataclasses.replace(
        report,
        candidates=tuple(candidates),
        per_image=tuple(per_image),
        gates=tuple(_gates(conv_scores, ref_scores, min_agreement, min_cosine)),
        warnings=tuple(warnings),
    )


__all__ += ["Skipped"]
