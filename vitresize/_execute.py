"""Carry out a :class:`~vitresize.plans.Plan`: resample the planned tensors, and have the destination's writer
stream them with everything else into a temp file (or folder) that is checked, verified on request, and renamed
into place. Which formats are involved is the reader's and the writer's business: nothing here asks.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .budgets import check_output, format_bytes
from .errors import CheckpointFormatError, InternalError, UsageError, VitresizeError, param
from .formats import ROOT, open_file, writer_for
from .formats._dtypes import nbytes
from .formats.atomic import check_apart
from .formats.base import Key, Replacement, WriteJob, Writer, Written
from .report import Report, Verification
from .resample.geometry import format_size

if TYPE_CHECKING:
    import torch

    from .formats import Checkpoint
    from .formats._copy import Progress
    from .plans import ModelPlan, Plan, TensorChange
    from .resample.torchfree import Table

__all__ = ["execute", "provenance", "resample"]


def _select(plan: Plan, ckpt: Checkpoint, writer: Writer, select: str | None) -> tuple[tuple[str, ...], list[str]]:
    """Which state dicts go into the output, and what of the source is left out."""
    if writer.whole_container:
        if select is not None:
            raise UsageError(
                f"{param('select')} only applies to an output of one state dict (.safetensors); a "
                f"{writer.suffixes[0]} keeps the whole container"
            )
        meta = (
            []
            if writer.keeps_metadata or not ckpt.metadata
            else [f"{ckpt.format} metadata ({len(ckpt.metadata)} entries)"]
        )
        return tuple(ckpt.state_dicts), meta
    if select is not None:
        if select not in ckpt.state_dicts:
            names = ", ".join(n or "(root)" for n in ckpt.state_dicts)
            raise UsageError(f"{param('select')} {select!r} is not a state dict of {ckpt.path}; it has: {names}")
        chosen = select
    else:
        vits = plan.state_dicts
        chosen = next((s for s in vits if "ema" not in s.rsplit("/", 1)[-1].lower()), vits[0])
    return (chosen,), ckpt.left_out(chosen)


def resample(plan: Plan, ckpt: Checkpoint) -> tuple[dict[Key, torch.Tensor], list[str]]:
    """The resampled tensors, and a warning for each input tensor holding NaN or Inf."""
    from .formats.base import nonfinite
    from .resample.ops import GENERATED, OPS

    owner = _owners(plan)
    out: dict[Key, torch.Tensor] = {}
    warnings: list[str] = []
    for c in plan.changes:
        m = owner[(c.state_dict, c.key)]
        t = ckpt.tensor(c.state_dict, c.key)
        if c.op not in GENERATED:
            t = t.to(plan.device)
            bad = nonfinite(t)
            if bad:
                name = f"{c.state_dict}/{c.key}" if c.state_dict else c.key
                warnings.append(
                    f"{name} holds {bad} NaN/Inf value(s) of {t.numel()}; interpolation spreads them into "
                    f"neighbouring entries of the output (is the checkpoint corrupt?)"
                )
        out[(c.state_dict, c.key)] = OPS[c.op](t, c, m, plan).cpu().contiguous()
    return out, warnings


def _owners(plan: Plan) -> dict[Key, ModelPlan]:
    """The model each planned tensor belongs to."""
    return {(c.state_dict, c.key): m for m in plan.models for c in plan.changes if _owned(m, c)}


def _owned(m: ModelPlan, c: TensorChange) -> bool:
    e = m.embedding
    return c.state_dict == e.state_dict and (c.key in (e.pos_key, e.patch_key) or any(c.key == t[0] for t in e.tied))


def _resample_torchfree(plan: Plan, ckpt: Checkpoint) -> dict[Key, Table] | None:
    """The resampled tensors computed with numpy, torch never imported; ``None`` unless every change is a
    position table (or row counter) that :mod:`.resample.torchfree` reproduces bit for bit."""
    from .resample.torchfree import Table, kernel_variant, matches_convention, resample_pos_table

    variant = kernel_variant()
    if (
        variant is None
        or plan.device != "cpu"
        or not matches_convention(plan.pos_convention)
        or any(c.op not in ("pos_embed", "position_ids") for c in plan.changes)
        or any(m.embedding.pos_layout not in ("1LD", "LD") for m in plan.models)
    ):
        return None
    import numpy as np

    owner = _owners(plan)
    out: dict[Key, Table] = {}
    for c in plan.changes:
        info = ckpt.state_dicts[c.state_dict][c.key]
        if c.op == "position_ids":
            if info.dtype != "int64":
                return None
            out[(c.state_dict, c.key)] = Table(np.arange(c.new_shape[-1], dtype="<i8").reshape(c.new_shape), "int64")
            continue
        raw = ckpt.raw_bytes(c.state_dict, c.key)
        if raw is None:
            return None
        m = owner[(c.state_dict, c.key)]
        table = resample_pos_table(
            raw,
            info.dtype,
            info.shape,
            old_grid=m.source.grid,
            new_grid=m.target.grid,
            num_prefix_tokens=m.embedding.prefix_rows,
            variant=variant,
        )
        if table is None:
            return None
        out[(c.state_dict, c.key)] = table
    return out


class _Resampled:
    """The resampled tensors, computed on first call: a safetensors write starts copying before torch loads.

    With ``torch_free`` (outputs written from raw bytes: safetensors), they are computed with numpy where
    that is exact (:func:`_resample_torchfree`), and torch is never imported; else with torch.
    """

    def __init__(self, plan: Plan, ckpt: Checkpoint, *, torch_free: bool = False) -> None:
        self.plan, self.ckpt = plan, ckpt
        self.changes = {(c.state_dict, c.key): c for c in plan.changes}
        self.warnings: list[str] = []
        self.torch_free = torch_free
        self.engine: str | None = None
        """``"numpy"`` or ``"torch"``: what computed them (``None`` until computed)."""
        self._out: dict[Key, Any] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> dict[Key, Any]:
        """``torch.Tensor`` values, or :class:`~.resample.torchfree.Table` ones with ``torch_free``."""
        with self._lock:  # writers call it from one thread today; a writer with threads of its own may not
            return self._compute()

    def _compute(self) -> dict[Key, Any]:
        if not self.plan.changes:  # nothing to resample: no torch import either
            self._out = {}
        if self._out is None:
            try:
                fast = _resample_torchfree(self.plan, self.ckpt) if self.torch_free and self.plan.changes else None
                if fast is not None:
                    self._out, self.engine = dict(fast), "numpy"
                else:
                    self._out, self.warnings = resample(self.plan, self.ckpt)
                    self.engine = "torch" if self.plan.changes else None
            except MemoryError:  # numpy's allocation failures (torch's are turned into one line in resample/)
                need = sum(nbytes(c.new_shape, c.dtype) for c in self.plan.changes)
                keys = ", ".join(c.key for c in self.plan.changes)
                raise VitresizeError(
                    f"out of memory while resampling {keys} (the new tensors alone take {format_bytes(need)}); "
                    f"choose a smaller target or free memory"
                ) from None
        return self._out

    def get(self, key: Key) -> torch.Tensor | Table:
        """One resampled tensor, checked against the plan's shape and dtype."""
        t: torch.Tensor | Table = self()[key]
        c = self.changes[key]
        if tuple(t.shape) != c.new_shape or str(t.dtype).removeprefix("torch.") != c.dtype:
            raise InternalError(f"{c.key} came out as {t.dtype} {list(t.shape)}, planned {c.dtype} {list(c.new_shape)}")
        return t

    def replacements(self, state_dicts: tuple[str, ...]) -> dict[Key, Replacement]:
        """The planned changes of these state dicts, each computed (with all the others) when first loaded."""
        return {
            k: Replacement(c.dtype, c.new_shape, functools.partial(self.get, k))
            for k, c in self.changes.items()
            if k[0] in state_dicts
        }


def provenance(plan: Plan) -> dict[str, str]:
    """The ``vitresize.*`` metadata a safetensors output of ``plan`` records (``batch --resume`` compares it)."""
    m = plan.models[0]
    return {
        "vitresize.version": __version__,
        "vitresize.source": plan.src.name,
        "vitresize.old_grid": format_size(m.source.grid),
        "vitresize.new_grid": format_size(m.target.grid),
        "vitresize.old_patch": format_size(m.source.patch),
        "vitresize.new_patch": format_size(m.target.patch),
        "vitresize.method": plan.method,
        "vitresize.interpolation": plan.pos_convention.interpolation,
        "vitresize.antialias": str(plan.pos_convention.antialias).lower(),
        "vitresize.patch_method": plan.patch_method,
    }


def _reopen(tmp: Path, dst: Path) -> Checkpoint:
    """The written output, opened by its reader to check it.

    Raises:
        InternalError: it cannot be read back (what vitresize wrote, its reader refuses).
    """
    try:
        return open_file(tmp)
    except VitresizeError as e:
        raise InternalError(f"the output for {dst} cannot be read back ({e}); nothing was written") from e


def _check_written(
    dst: Path, ckpt: Checkpoint, out: Checkpoint, writer: Writer, sds: tuple[str, ...], changes: dict[Key, Any]
) -> None:
    """Compare what the output holds (re-read header-first) with the plan: every tensor, its shape and dtype.

    Raises:
        InternalError: they differ.
    """
    from .keymaps import TensorInfo

    def planned(sd: str) -> dict[str, TensorInfo]:
        infos = ckpt.state_dicts[sd]
        return {
            k: TensorInfo(changes[(sd, k)].new_shape, info.dtype) if (sd, k) in changes else info
            for k, info in infos.items()
        }

    want = {sd: planned(sd) for sd in sds} if writer.whole_container else {ROOT: planned(sds[0])}
    if out.state_dicts != want:
        raise InternalError(f"the output for {dst} does not hold the planned tensors; nothing was written")


def _report(
    plan: Plan,
    dst: Path,
    writer: Writer,
    sds: tuple[str, ...],
    left: list[str],
    written: Written | None = None,
    warnings: list[str] | None = None,
    verified: Verification | None = None,
    engine: str | None = None,
) -> Report:
    assert plan.checkpoint is not None
    warnings = [*plan.warnings, *(warnings or [])]
    if writer.whole_container and "optimizer" in plan.checkpoint.extras and plan.changes:
        warnings.append(
            "the optimizer state is kept as it is, with moments of the old shapes; start a new optimizer "
            "rather than resuming it from this checkpoint"
        )
    tensors = sum(len(plan.checkpoint.state_dicts[s]) for s in sds)
    changed = sum(1 for c in plan.changes if c.state_dict in sds)
    return Report(
        plan=plan,
        dst=dst,
        dst_format=writer.format,
        dry_run=written is None,
        bytes_written=written.bytes if written else 0,
        written_state_dicts=sds,
        left_out=tuple(left),
        warnings=tuple(warnings),
        passed_through=tensors - changed,
        verified=verified,
        engine=engine,
        cloned_bytes=_cloned(dst) if written else None,
        rewritten=written.rewritten if written else (),
        copied=written.copied if written else (),
    )


def _cloned(dst: Path) -> int | None:
    """The output's bytes that a copy-on-write file system cloned (the files of a folder added up)."""
    from .formats._fiemap import shared_bytes

    files = sorted(p for p in dst.iterdir() if p.is_file() and not p.is_symlink()) if dst.is_dir() else [dst]
    counts = [shared_bytes(f) for f in files]
    return None if any(c is None for c in counts) else sum(c or 0 for c in counts)


def _ticker(progress: Callable[[int, int], None], total: int) -> Progress:
    """Turn the writers' byte counts (from two threads) into ``progress(done, total)`` calls."""
    lock = threading.Lock()
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            progress(done, max(total, done))

    return tick


def _io_error(e: OSError, ckpt: Checkpoint, dst: Path) -> CheckpointFormatError:
    """An OS error while writing, as one line naming the file it happened on: DST's temp file, or a source file
    read on the way (a shard, a copied file; where the OS says which)."""
    name = os.fsdecode(e.filename) if isinstance(e.filename, (str, bytes)) else None
    what = e.strerror or str(e)
    reads = [ckpt.path, *ckpt.source_files()]  # a folder's files, hub blobs included
    try:
        source = name is not None and any(Path(name).resolve().is_relative_to(p.resolve()) for p in reads)
    except (OSError, RuntimeError, ValueError):  # a link loop, a name the OS refuses
        source = False
    if source:
        return CheckpointFormatError(f"cannot read {name} while writing {dst}: {what}")
    return CheckpointFormatError(f"cannot write {dst}: {what}")


def execute(
    plan: Plan,
    dst: Path,
    *,
    force: bool,
    select: str | None,
    dry_run: bool = False,
    verify: bool = False,
    fsync: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Resample, write ``dst`` atomically, check the output against the plan; see :func:`vitresize.convert`.

    With ``dry_run``, only the destination, the selection and the output's size are checked.
    """
    ckpt = plan.checkpoint
    assert ckpt is not None and not ckpt.closed  # Plan.execute checked it
    if dst.name in ("", ".", ".."):
        raise UsageError(f"DST {str(dst)!r} names no file or folder of its own; give it by name (e.g. ../out)")
    check_apart(ckpt.path, dst)  # neither holding SRC nor inside it, links resolved (DST == SRC: replace with force)
    writer = writer_for(ckpt, dst)
    writer.check_source(ckpt)
    writer.check_destination(ckpt, dst, force=force)
    sds, left = _select(plan, ckpt, writer, select)
    if writer.stores_every_element and not plan.allow_large:
        new = {c.key: c.new_shape for c in plan.changes if c.state_dict == sds[0]}
        check_output(ckpt.state_dicts[sds[0]], new, ckpt.size_bytes, dst.name)
    if dry_run:
        return _report(plan, dst, writer, sds, left)
    resampled = _Resampled(plan, ckpt, torch_free=writer.writes_raw(ckpt))
    m = plan.models[0]
    t = m.target
    moved = plan.changes or (m.embedding.grid_known and m.target != m.source) or m.window != m.embedding.window
    job = WriteJob(
        ckpt,
        sds,
        resampled.replacements(sds),
        provenance(plan),
        geometry=(t.img_size, t.patch) if moved and t.grid != (0, 0) else None,
        window=m.window if m.window != m.embedding.window else None,
        patch_changed=m.target.patch != m.source.patch,
    )
    verified = None
    tick = _ticker(progress, ckpt.size_bytes) if progress else None
    try:
        with writer.atomic(ckpt, dst, force=force, fsync=fsync) as tmp:
            written = writer.write(tmp, job, tick)
            with _reopen(tmp, dst) as out:
                _check_written(dst, ckpt, out, writer, sds, resampled.changes)
                if verify:
                    from ._verify import verify_output  # hashlib and the hashing code: --verify only

                    verified = verify_output(ckpt, out, writer.whole_container, sds, set(resampled.changes))
    except OSError as e:
        raise _io_error(e, ckpt, dst) from None
    resampled()  # a no-op unless nothing was written from it (e.g. only another state dict changed)
    return _report(plan, dst, writer, sds, left, written, resampled.warnings, verified, resampled.engine)
