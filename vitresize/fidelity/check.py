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
from ..errors import GeometryError, Message, UsageError, VitresizeError, param
from ..options import Options, Target
from ..resample.conventions import METHODS
from ..resample.geometry import format_size
from .base import Architecture, LoadResult, Outputs, Runner, Side, library_of, require
from .images import folder_images, sample_images
from .metrics import ImageScores, Scores, aggregate, compare
from .results import COSINE_MARGIN, TOP1_MARGIN, Candidate, CheckReport, Gate, SideReport
from .sides import convert_side, read_side

if TYPE_CHECKING:
    from ..options import Family, SizeLike

__all__ = ["RUNNERS", "check"]

RUNNERS = {
    "timm": "vitresize.fidelity.lib_timm",
    "transformers": "vitresize.fidelity.lib_hf",
    "open_clip": "vitresize.fidelity.lib_open_clip",
    "torchvision": "vitresize.fidelity.lib_torchvision",
}
"""Library -> the module whose ``build(side, *, model, device)`` makes its :class:`~.base.Runner`."""

BATCH = 16


def _runner(side: Side, model: str | None, device: str, like: Architecture | None = None) -> Runner:
    """The library's model for ``side``; ``like``: the original's architecture, which timm's runner builds again
    at the side's geometry (so that a guessed head count, or a config on one side only, cannot make the two
    differ)."""
    library = library_of(side.family)
    require(library)
    build: Callable[..., Runner] = importlib.import_module(RUNNERS[library]).build
    if library == "timm" and like is not None and model is None:
        return build(side, device=device, like=like)
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


def _run(runner: Runner, side: Side, batch: Sequence[Any]) -> Outputs:
    """One batch through the model; the library failing to run it is one line (exit 1), not a traceback."""
    import torch

    try:
        return runner.forward(torch.stack([runner.preprocess(im) for im in batch]))
    except (RuntimeError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GeometryError(
            f"{runner.architecture.library} cannot run {side.path} at image size {format_size(side.img_size)} "
            f"({first}); the library does not support this geometry for {runner.architecture.name}"
        ) from None


def _outputs(
    runner: Runner, side: Side, batches: Sequence[Sequence[Any]], tick: Callable[[int], None]
) -> list[Outputs]:
    out = []
    for batch in batches:
        out.append(_run(runner, side, batch))
        tick(len(batch))
    return out


def _score(
    runner: Runner,
    side: Side,
    names: Sequence[Sequence[str]],
    batches: Sequence[Sequence[Any]],
    reference: Sequence[Outputs],
    tick: Callable[[int], None],
) -> list[ImageScores]:
    scores: list[ImageScores] = []
    for n, batch, ref in zip(names, batches, reference, strict=True):
        scores += compare(n, ref, _run(runner, side, batch))
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


def _methods(chosen: str | Sequence[str]) -> Callable[[bool], list[tuple[str, str]]]:
    """The ``(method, patch_method)`` pairs to compare, once it is known whether the patch changes: ``"all"`` is
    every method (and the kernel interpolated without PI where the patch changes), ``"default"`` none beyond
    the reference; names may come as a list or as one comma-separated string.

    Raises:
        UsageError: a name that is not a method.
    """
    if isinstance(chosen, str):
        chosen = [n.strip() for n in chosen.split(",") if n.strip()]
    everything = "all" in chosen
    names = list(METHODS) if everything else list(dict.fromkeys(n for n in chosen if n != "default"))
    for n in names:
        if n not in METHODS:
            raise UsageError(
                f"{param('methods')} {n!r} is not a method; give default, all, or names of: {', '.join(METHODS)}"
            )

    def pairs(patch_changes: bool) -> list[tuple[str, str]]:
        return [(n, "pi") for n in names] + ([("native", "interp")] if everything and patch_changes else [])

    return pairs


def _check_gates(limit: int | None, min_agreement: float | None, min_cosine: float | None) -> None:
    if limit is not None and limit < 1:
        raise UsageError(f"{param('limit')} must be at least 1, not {limit}")
    if min_agreement is not None and not 0 <= min_agreement <= 100:
        raise UsageError(f"{param('min_agreement')} is a percentage (0 to 100), not {min_agreement}")
    if min_cosine is not None and not -1 <= min_cosine <= 1:
        raise UsageError(f"{param('min_cosine')} is a cosine similarity (-1 to 1), not {min_cosine}")


def _differs(a: Architecture, b: Architecture) -> bool:
    return (a.library, a.name, a.args) != (b.library, b.name, b.args)


def _config_agrees(side: Side, load: LoadResult) -> LoadResult:
    """``load``, with the config.json's geometry added as mismatched where it contradicts the weights (the
    library would build the model the config says, and fail to load them)."""
    said = []
    if side.config_img_size is not None and side.config_img_size != side.img_size:
        said.append(
            f"config.json: image size {format_size(side.config_img_size)} vs the weights' {format_size(side.img_size)}"
        )
    if side.config_patch is not None and side.config_patch != side.patch and side.embedding.stem is None:
        said.append(f"config.json: patch {format_size(side.config_patch)} vs the weights' {format_size(side.patch)}")
    return dataclasses.replace(load, mismatched=(*load.mismatched, *said)) if said else load


def _head_gate(classes: int) -> Gate:
    return Gate(
        "classifier head",
        None,
        float(classes),
        False,
        f"CONVERTED has no classifier head of the original's {classes} classes (a head of another size, or none)",
    )


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
    from_img_size: SizeLike | None = None,
    from_grid: SizeLike | None = None,
    img_size: SizeLike | None = None,
    grid: SizeLike | None = None,
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
        methods: ``"default"`` (the reference only), ``"all"`` (every method, ranked), or method names (a
            list, or one comma-separated string).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        min_agreement: an absolute gate on the top-1 agreement, in percent.
        min_cosine: an absolute gate on the pooled-feature cosine similarity.
        family: the checkpoints' family (``auto``: from the key names).
        from_img_size: the original's image size, where its weights cannot tell it.
        from_grid: the original's patch grid, instead of ``from_img_size``.
        img_size: CONVERTED's image size, where its weights cannot tell it (a non-square ``.pth``).
        grid: CONVERTED's patch grid, instead of ``img_size``.
        progress: called as ``progress(images_done, images_total)``.

    Returns:
        A :class:`CheckReport`; ``report.ok`` is the verdict.

    Raises:
        MissingDependencyError: the model library, Pillow or scikit-image (default images) is not installed.
        UsageError: bad options, or the two checkpoints are not of one family.
        VitresizeError: a checkpoint cannot be read, or its architecture cannot be told.
    """
    Options(device=device)  # the spelling (cpu, cuda, cuda:N)
    _check_device(device)
    _check_gates(limit, min_agreement, min_cosine)
    pairs_of = _methods(methods)
    orig = read_side(original, family=family, from_img_size=from_img_size, from_grid=from_grid)
    conv = read_side(converted, family=family, from_img_size=img_size, from_grid=grid, role="CONVERTED")
    if library_of(orig.family) != library_of(conv.family):
        raise UsageError(
            f"{original} is a {orig.family} checkpoint but {converted} is a {conv.family} one; check compares a "
            f"checkpoint with its own conversion"
        )
    if conv.embedding.prefix_rows != orig.embedding.prefix_rows and img_size is None and grid is None:
        raise GeometryError(
            f"{converted}'s position table was read as a {format_size(conv.grid)} grid with "
            f"{conv.embedding.prefix_rows} prefix row(s), but the original has {orig.embedding.prefix_rows}; give "
            f"CONVERTED's geometry with {param('img_size')} HxW (or {param('grid')} HxW)"
        )
    runner_o = _runner(orig, model, device)
    runner_c = _runner(conv, model, device, like=runner_o.architecture)
    warnings = [n for n in dict.fromkeys((runner_o.architecture.note, runner_c.architecture.note)) if n]
    if _differs(runner_o.architecture, runner_c.architecture):
        warnings.append(
            Message(
                f"ORIGINAL and CONVERTED were built as different architectures ({runner_o.architecture.describe()} "
                f"vs {runner_c.architecture.describe()}); pass {param('model')} NAME to build both alike"
            )
        )
    load_c = _config_agrees(conv, runner_c.load)
    report = CheckReport(
        original=_side_report(orig, runner_o),
        converted=dataclasses.replace(_side_report(conv, runner_c), load=load_c),
        image_source="none: the models were not run (a strict load failed)",
        images=0,
        skipped=(),
        candidates=(),
        per_image=(),
        gates=(),
        warnings=tuple(warnings),
    )
    if not (runner_o.load.ok and load_c.ok):
        return report
    largest = max(max(runner_o.input_size), max(runner_c.input_size))
    if images is not None:
        pictures, skipped = folder_images(Path(images), limit, max_side=max(2 * largest, 256))
        source = f"folder {images}"
    else:
        pictures, skipped = sample_images(limit), []
        source = "scikit-image sample photographs (whole and quadrants)"
    names = [[n for n, _ in pictures[i : i + BATCH]] for i in range(0, len(pictures), BATCH)]
    batches = [[im for _, im in pictures[i : i + BATCH]] for i in range(0, len(pictures), BATCH)]
    pairs = pairs_of(conv.patch != orig.patch)
    total = len(pictures) * (3 + len(pairs))
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    base = _outputs(runner_o, orig, batches, tick)
    per_image = _score(runner_c, conv, names, batches, base, tick)
    del runner_c
    target = _target_of(orig, conv)
    like = runner_o.architecture

    def candidate(name: str, method: str, patch_method: str) -> Candidate:
        options = Options(family=family, method=method, patch_method=patch_method, device=device)  # type: ignore[arg-type]
        try:
            side = convert_side(orig, target, options)
        except VitresizeError as e:
            tick(len(pictures))
            return Candidate(name, method, patch_method, None, str(e))
        scores = _score(_runner(side, model, device, like=like), side, names, batches, base, tick)
        return Candidate(name, method, patch_method, aggregate(scores))

    reference = candidate("reference", "native", "pi")
    if reference.scores is None:
        raise GeometryError(f"vitresize cannot convert {original} to {converted}'s geometry: {reference.note}")
    conv_scores = aggregate(per_image)
    ranked = sorted(
        (candidate(m if p == "pi" else f"{m} (patch {p})", m, p) for m, p in pairs),
        key=_rank_key,
    )
    if target.grid == orig.grid and target.patch is None and target.window is None:
        warnings.append(
            f"{converted} has the original's geometry ({format_size(orig.grid)} grid, patch "
            f"{format_size(orig.patch)}): the reference is the original itself"
        )
    gates = _gates(conv_scores, reference.scores, min_agreement, min_cosine)
    if base[0].logits is not None and conv_scores.top1_agreement is None:
        gates.insert(0, _head_gate(base[0].logits.shape[-1]))
    return dataclasses.replace(
        report,
        image_source=source,
        images=len(pictures),
        skipped=tuple(skipped),
        candidates=(Candidate("converted", None, None, conv_scores), reference, *ranked),
        per_image=tuple(per_image),
        gates=tuple(gates),
        warnings=tuple(warnings),
    )
