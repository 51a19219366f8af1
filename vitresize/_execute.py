"""Carry out a :class:`~vitresize.plan.Plan`: resample the planned tensors, stream the rest, write atomically."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._verify import Verification, verify_output
from ._version import __version__
from .errors import CheckpointFormatError, UsageError, VitresizeError
from .formats import ROOT, output_format
from .formats._dtypes import nbytes
from .formats.atomic import atomic_path, check_apart, check_destination, check_folder_destination, check_not_holding
from .resample.geometry import format_size

if TYPE_CHECKING:
    import torch

    from .formats import Checkpoint
    from .formats.safetensors import Progress, Segment
    from .formats.torch_pickle import TorchCheckpoint
    from .plan import ModelPlan, Plan, Report
    from .resample.torchfree import Table

__all__ = ["dry_run_report", "execute"]

Key = tuple[str, str]  # (state dict, tensor key)


def _select(plan: Plan, ckpt: Checkpoint, dst_format: str, select: str | None) -> tuple[tuple[str, ...], list[str]]:
    """Which state dicts go into the output, and what of the source is left out."""
    if dst_format == "torch":
        if select is not None:
            raise UsageError("--select only applies to a .safetensors output; a .pth keeps the whole container")
        meta = [f"safetensors metadata ({len(ckpt.metadata)} entries)"] if ckpt.metadata else []
        return tuple(ckpt.state_dicts), meta
    if select is not None:
        if select not in ckpt.state_dicts:
            names = ", ".join(n or "(root)" for n in ckpt.state_dicts)
            raise UsageError(f"--select {select!r} is not a state dict of {ckpt.path}; it has: {names}")
        chosen = select
    else:
        vits = plan.state_dicts
        chosen = next((s for s in vits if "ema" not in s.rsplit("/", 1)[-1].lower()), vits[0])
    left: list[str] = []
    torch_ckpt = _as_torch(ckpt)
    if chosen != ROOT:
        root = chosen.split("/")[0]
        tops = torch_ckpt.top_keys() if torch_ckpt is not None else []
        left += [t for t in tops if t != root]
        left += [s for s in ckpt.state_dicts if s != chosen and s.split("/")[0] == root]
    if torch_ckpt is not None:
        left += [f"{k} (not a tensor)" for k in torch_ckpt.non_tensors(chosen)]
    return (chosen,), left


def _check_output_size(plan: Plan, ckpt: Checkpoint, fmt: str, name: str, dst: Path) -> None:
    """Refuse a ``.safetensors`` output that would be over :data:`~.plan.LARGE_RATIO` times its source (and over
    :data:`~.plan.LARGE_FLOOR`), unless ``plan.allow_large``.

    :func:`vitresize.plan` bounds the output from the planned changes. This is the part that depends on the
    output: a ``.pth`` may hold a broadcast view (``torch.zeros(1).expand(20000, 20000)``) in a few bytes,
    which ``torch.save`` keeps as small, but a ``.safetensors`` file stores every element.

    Raises:
        UsageError: the output would be over the budget.
    """
    from .plan import LARGE_FLOOR, LARGE_RATIO, format_bytes

    if plan.allow_large or fmt != "safetensors":
        return
    new = {c.key: c.new_shape for c in plan.changes if c.state_dict == name}
    sizes = {k: nbytes(new.get(k, info.shape), info.dtype) for k, info in ckpt.state_dicts[name].items()}
    total, source = sum(sizes.values()), ckpt.path.stat().st_size
    if total <= max(LARGE_RATIO * source, LARGE_FLOOR):
        return
    big = max(sizes, key=lambda k: sizes[k])
    shape = list(new.get(big, ckpt.state_dicts[name][big].shape))
    raise UsageError(
        f"{dst.name} would hold {format_bytes(total)} of tensors, {total // max(source, 1)}x the source's "
        f"{format_bytes(source)} ({big} {shape} alone is {format_bytes(sizes[big])}; a .safetensors file stores "
        f"every element of a broadcast or shared tensor that a .pth keeps once); write a .pth, or pass "
        f"--allow-large if you mean it"
    )


def _as_torch(ckpt: Checkpoint) -> TorchCheckpoint | None:
    from .formats.torch_pickle import TorchCheckpoint

    return ckpt if isinstance(ckpt, TorchCheckpoint) else None


def _resample(plan: Plan, ckpt: Checkpoint) -> tuple[dict[Key, torch.Tensor], list[str]]:
    """The resampled tensors, and a warning for each input tensor holding NaN or Inf."""
    from .formats.base import nonfinite
    from .resample.patch_embed import resample_patch_embed
    from .resample.pos_embed import resample_pos_embed

    owner = _owners(plan)
    out: dict[Key, torch.Tensor] = {}
    warnings: list[str] = []
    for c in plan.changes:
        m = owner[(c.state_dict, c.key)]
        e = m.embedding
        if c.op == "position_ids":
            out[(c.state_dict, c.key)] = _position_ids(ckpt.tensor(c.state_dict, c.key), c.new_shape)
            continue
        t = ckpt.tensor(c.state_dict, c.key).to(plan.device)
        bad = nonfinite(t)
        if bad:
            name = f"{c.state_dict}/{c.key}" if c.state_dict else c.key
            warnings.append(
                f"{name} holds {bad} NaN/Inf value(s) of {t.numel()}; interpolation spreads them into "
                f"neighbouring entries of the output (is the checkpoint corrupt?)"
            )
        if c.op == "pos_embed":
            table = t.unsqueeze(0) if e.pos_layout == "LD" else t
            new = resample_pos_embed(
                table,
                old_grid=m.source.grid,
                new_grid=m.target.grid,
                num_prefix_tokens=e.prefix_rows,
                convention=plan.pos_convention,
            )
            new = new.squeeze(0) if e.pos_layout == "LD" else new
        else:
            kernel = t.permute(3, 2, 0, 1) if e.patch_layout == "HWIO" else t  # HWIO -> OIHW
            new = resample_patch_embed(kernel, m.target.patch, basis=plan.patch_convention, method=plan.patch_method)
            new = new.permute(2, 3, 1, 0) if e.patch_layout == "HWIO" else new
        out[(c.state_dict, c.key)] = new.cpu().contiguous()
    return out, warnings


def _owners(plan: Plan) -> dict[Key, ModelPlan]:
    """The model each planned tensor belongs to."""
    return {
        (m.embedding.state_dict, k): m
        for m in plan.models
        for k in (m.embedding.pos_key, m.embedding.patch_key, m.embedding.position_ids_key)
        if k is not None
    }


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


def _position_ids(old: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A ``[1, rows]`` row counter of the old buffer's dtype."""
    import torch

    return torch.arange(shape[1], dtype=old.dtype).reshape(shape)


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

    def __call__(self) -> dict[Key, Any]:
        """``torch.Tensor`` values, or :class:`~.resample.torchfree.Table` ones with ``torch_free``."""
        if self._out is None:
            try:
                fast = _resample_torchfree(self.plan, self.ckpt) if self.torch_free and self.plan.changes else None
                if fast is not None:
                    self._out, self.engine = dict(fast), "numpy"
                else:
                    self._out, self.warnings = _resample(self.plan, self.ckpt)
                    self.engine = "torch" if self.plan.changes else None
            except MemoryError:  # numpy's allocation failures (torch's are turned into one line in resample/)
                from .plan import format_bytes

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
            raise VitresizeError(
                f"internal check failed: {c.key} came out as {t.dtype} {list(t.shape)} (a vitresize bug)"
            )
        return t


def _provenance(plan: Plan) -> dict[str, str]:
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


def _write_safetensors(
    plan: Plan, ckpt: Checkpoint, name: str, resampled: _Resampled, tmp: Path, progress: Progress | None
) -> int:
    from .formats._dtypes import TORCH_TO_ST
    from .formats.safetensors import SafetensorsCheckpoint, Segment, read_header, write_safetensors
    from .formats.torch_pickle import TorchCheckpoint

    def planned(key: str) -> Segment:
        c = resampled.changes[(name, key)]
        size = nbytes(c.new_shape, c.dtype)
        return Segment(key, c.dtype, c.new_shape, size, tensor=lambda: resampled.get((name, key)))

    segments: list[Segment] = []
    src_fd = os.open(ckpt.path, os.O_RDONLY)
    try:
        if isinstance(ckpt, SafetensorsCheckpoint):
            for key, e in sorted(ckpt.entries.items(), key=lambda kv: kv[1].start):
                info = ckpt.state_dicts[ROOT][key]
                if (ROOT, key) in resampled.changes:
                    segments.append(planned(key))
                else:
                    segments.append(Segment(key, info.dtype, info.shape, e.end - e.start, copy_from=(src_fd, e.start)))
        elif isinstance(ckpt, TorchCheckpoint):
            ranges = ckpt.file_ranges(name)
            for key, info in ckpt.state_dicts[name].items():
                if (name, key) in resampled.changes:
                    segments.append(planned(key))
                elif key in ranges:
                    segments.append(
                        Segment(key, info.dtype, info.shape, ranges[key][1], copy_from=(src_fd, ranges[key][0]))
                    )
                else:
                    segments.append(_tensor_segment(ckpt, name, key))
        else:  # any other reader (.npz): one flat state dict, each tensor read when written
            for key in ckpt.state_dicts[name]:
                segments.append(planned(key) if (name, key) in resampled.changes else _tensor_segment(ckpt, name, key))
        metadata = {"format": "pt", **ckpt.metadata, **_provenance(plan)}
        written = write_safetensors(tmp, segments, metadata, progress)
    finally:
        os.close(src_fd)
    _, entries, _ = read_header(tmp)
    got = {k: (e.shape, e.dtype) for k, e in entries.items()}
    want = {s.name: (s.shape, TORCH_TO_ST[s.dtype]) for s in segments}
    if got != want:
        raise VitresizeError(f"internal check failed: {tmp} does not hold the planned tensors (a vitresize bug)")
    return written


def _tensor_segment(ckpt: Checkpoint, name: str, key: str) -> Segment:
    """A tensor written from its data (read when the writer gets to it), not copied as a byte range."""
    from .formats.safetensors import Segment

    info = ckpt.state_dicts[name][key]
    return Segment(key, info.dtype, info.shape, nbytes(info.shape, info.dtype), tensor=lambda: ckpt.tensor(name, key))


def _write_torch(ckpt: Checkpoint, repl: dict[Key, torch.Tensor], tmp: Path, progress: Progress | None) -> int:
    from .formats.safetensors import SafetensorsCheckpoint
    from .formats.torch_pickle import TorchCheckpoint, iter_state_dicts, load_container, replace_tensors, save_container

    if isinstance(ckpt, TorchCheckpoint):
        by_sd: dict[str, dict[str, torch.Tensor]] = {}
        for (sd, key), t in repl.items():
            by_sd.setdefault(sd, {})[key] = t
        # One new dict per state dict, whatever the paths to it: an aliased one ({"model": sd, "ema": sd}) stays one.
        container = replace_tensors(ckpt.container, {ckpt.path_of(sd): ts for sd, ts in by_sd.items()})
    elif isinstance(ckpt, SafetensorsCheckpoint):
        container = OrderedDict(
            (k, repl[(ROOT, k)] if (ROOT, k) in repl else ckpt.mapped_tensor(k)) for k in ckpt.entries
        )
    else:  # any other reader (.npz): one flat state dict
        container = OrderedDict(
            (k, repl[(ROOT, k)] if (ROOT, k) in repl else ckpt.tensor(ROOT, k)) for k in ckpt.state_dicts[ROOT]
        )
    save_container(container, tmp, progress, sources=(ckpt.path,))
    # Re-read what was written (mmap: headers and shapes only) and check it against the plan.
    got = {
        "/".join(p): {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}
        for p, sd in iter_state_dicts(load_container(tmp, mmap=True))
    }
    want = {
        name: {k: tuple(repl[(name, k)].shape) if (name, k) in repl else info.shape for k, info in infos.items()}
        for name, infos in ckpt.state_dicts.items()
    }
    if got != want:
        raise VitresizeError(f"internal check failed: {tmp} does not hold the planned tensors (a vitresize bug)")
    return tmp.stat().st_size


def _write_npz(ckpt: Checkpoint, repl: dict[Key, torch.Tensor], tmp: Path, progress: Progress | None) -> int:
    from .formats.npz import NpzCheckpoint, write_npz

    assert isinstance(ckpt, NpzCheckpoint)  # _destination checked it
    return write_npz(ckpt, {k: t for (_, k), t in repl.items()}, tmp, progress)


def _report(
    plan: Plan,
    dst: Path,
    fmt: str,
    written: int,
    sds: tuple[str, ...],
    left: list[str],
    *,
    dry: bool = False,
    warnings: list[str] | None = None,
    verified: Verification | None = None,
    engine: str | None = None,
) -> Report:
    from .plan import Report

    assert plan.checkpoint is not None
    warnings = [*plan.warnings, *(warnings or [])]
    if fmt == "torch" and "optimizer" in plan.checkpoint.extras and plan.changes:
        warnings.append(
            "the optimizer state is kept as it is, with moments of the old shapes; start a new optimizer "
            "rather than resuming it from this checkpoint"
        )
    tensors = sum(len(plan.checkpoint.state_dicts[s]) for s in sds)
    changed = sum(1 for c in plan.changes if c.state_dict in sds)
    return Report(
        plan=plan,
        dst=dst,
        dst_format=fmt,
        dry_run=dry,
        bytes_written=written,
        written_state_dicts=sds,
        left_out=tuple(left),
        warnings=tuple(warnings),
        passed_through=tensors - changed,
        verified=verified,
        engine=engine,
    )


def _destination(ckpt: Checkpoint, dst: Path, force: bool) -> str:
    """The output format (``folder`` for a sharded input), with DST checked for it: neither holding SRC nor
    inside it, links resolved (DST equal to SRC is an atomic replace with ``force``)."""
    from .formats.folder import ShardedCheckpoint

    if dst.name in ("", ".", ".."):
        raise UsageError(f"DST {str(dst)!r} names no file or folder of its own; give it by name (e.g. ../out)")
    check_apart(ckpt.path, dst)
    if isinstance(ckpt, ShardedCheckpoint):
        src = ckpt.path.resolve()
        for folder in dict.fromkeys(real.parent for real in ckpt.files.values() if src not in real.parents):
            check_not_holding(folder, dst, f"holds files that {ckpt.path} links to")
        check_folder_destination(dst, force=force)
        return "folder"
    fmt = output_format(dst)
    if fmt == "npz" and ckpt.format != "npz":
        raise UsageError(f"a .npz output needs a .npz input (JAX layout); write {ckpt.format} input as .safetensors")
    check_destination(dst, force=force)
    return fmt


def _raw_output(ckpt: Checkpoint, fmt: str) -> bool:
    """Whether every changed tensor is written as raw bytes (safetensors), so numpy-held ones will do."""
    from .formats.folder import ShardedCheckpoint

    if isinstance(ckpt, ShardedCheckpoint):
        return all(s.format == "safetensors" for s in ckpt.shards.values())
    return fmt == "safetensors"


def dry_run_report(plan: Plan, dst: Path, *, force: bool, select: str | None) -> Report:
    """Validate the destination and the selection as :func:`execute` would, without reading or writing data."""
    assert plan.checkpoint is not None
    fmt = _destination(plan.checkpoint, dst, force)
    sds, left = ((ROOT,), []) if fmt == "folder" else _select(plan, plan.checkpoint, fmt, select)
    _check_output_size(plan, plan.checkpoint, fmt, sds[0], dst)
    return _report(plan, dst, fmt, 0, sds, left, dry=True)


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


def _io_error(e: OSError, plan: Plan, dst: Path) -> CheckpointFormatError:
    """An OS error while writing, as one line naming the file it happened on: DST's temp file, or a source file
    read on the way (a shard, a copied file; where the OS says which)."""
    name = os.fsdecode(e.filename) if isinstance(e.filename, (str, bytes)) else None
    what = e.strerror or str(e)
    reads = [plan.src, *getattr(plan.checkpoint, "files", {}).values()]  # a folder's files, hub blobs included
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
    verify: bool = False,
    fsync: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Resample, write ``dst`` atomically, check the output against the plan; see :func:`vitresize.convert`."""
    ckpt = plan.checkpoint
    if ckpt is None:
        raise ValueError("this plan has no open checkpoint (was it closed?)")
    fmt = _destination(ckpt, dst, force)
    resampled = _Resampled(plan, ckpt, torch_free=_raw_output(ckpt, fmt))
    if fmt == "folder":
        return _execute_folder(plan, ckpt, resampled, dst, force=force, verify=verify, fsync=fsync, progress=progress)
    sds, left = _select(plan, ckpt, fmt, select)
    _check_output_size(plan, ckpt, fmt, sds[0], dst)
    verified = None
    tick = _ticker(progress, ckpt.path.stat().st_size) if progress else None
    try:
        with atomic_path(dst, force=force, fsync=fsync, mode=ckpt.path.stat().st_mode) as tmp:
            if fmt == "safetensors":
                written = _write_safetensors(plan, ckpt, sds[0], resampled, tmp, tick)
            elif fmt == "npz":
                written = _write_npz(ckpt, resampled(), tmp, tick)
            else:
                written = _write_torch(ckpt, resampled(), tmp, tick)
            if verify:
                verified = verify_output(ckpt, tmp, fmt, sds, set(resampled.changes))
    except OSError as e:
        raise _io_error(e, plan, dst) from None
    resampled()  # a no-op unless nothing was written from it (e.g. only another state dict changed)
    return _report(
        plan, dst, fmt, written, sds, left, warnings=resampled.warnings, verified=verified, engine=resampled.engine
    )


def _execute_folder(
    plan: Plan,
    ckpt: Checkpoint,
    resampled: _Resampled,
    dst: Path,
    *,
    force: bool,
    verify: bool,
    fsync: bool,
    progress: Callable[[int, int], None] | None,
) -> Report:
    from ._execute_folder import write_folder
    from .formats.folder import ShardedCheckpoint

    assert isinstance(ckpt, ShardedCheckpoint)
    size = sum(s.path.stat().st_size for s in ckpt.shards.values())
    tick = _ticker(progress, size) if progress else None
    try:
        written, rewritten, copied, verified = write_folder(
            plan, ckpt, resampled, dst, force=force, verify=verify, fsync=fsync, progress=tick
        )
    except OSError as e:
        raise _io_error(e, plan, dst) from None
    resampled()
    left = [
        f"{name} (another copy of the weights; only {next(iter(ckpt.shards))} was converted)"
        for name in ckpt.duplicates
    ]
    rep = _report(
        plan,
        dst,
        "folder",
        written,
        (ROOT,),
        left,
        warnings=resampled.warnings,
        verified=verified,
        engine=resampled.engine,
    )
    return dataclasses.replace(rep, rewritten=tuple(rewritten), copied=tuple(copied))
