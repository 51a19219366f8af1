"""Everything the CLI shows: tables and summaries on stdout, messages on stderr, JSON. The only rich user."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .plan import Embedding, Inspection, Report
from .resample.geometry import format_size

__all__ = ["error", "info", "inspection", "json_out", "left_out", "progress", "report", "warning"]

# Piped output (CI logs) gets a wide console instead of rich's 80 columns, so keys and shapes never wrap.
_out = Console(highlight=False, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
_err = Console(stderr=True, highlight=False, soft_wrap=True)


def _shape(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def _sd(name: str) -> str:
    return name or "(root)"


def json_out(data: dict[str, Any]) -> None:
    """One compact JSON object on stdout."""
    sys.stdout.write(json.dumps(data, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    """One ``Error:`` line on stderr (never wrapped, user text escaped)."""
    _err.print(f"[bold red]Error:[/] {escape(message)}")


def warning(message: str) -> None:
    _err.print(f"[yellow]Warning:[/] {escape(message)}")


def info(message: str) -> None:
    _err.print(f"[dim]{escape(message)}[/]")


PROGRESS_MIN_BYTES = 256 * 1024 * 1024


@contextlib.contextmanager
def progress(size: int, *, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A transient progress bar on stderr for big inputs when stderr is a terminal; else ``None``."""
    if not enabled or size < PROGRESS_MIN_BYTES or not _err.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("writing"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=_err,
        transient=True,
    )
    task = bar.add_task("write", total=size)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _summary(rows: list[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for k, v in rows:
        grid.add_row(k, v)
    return grid


def report(rep: Report, *, verbose: bool = False) -> None:
    """The table of changed tensors and the summary of a conversion, on stdout."""
    plan = rep.plan
    if plan.changes:
        show_sd = any(c.state_dict for c in plan.changes)
        table = Table(title="Tensors that change", title_justify="left", header_style="bold")
        if show_sd:
            table.add_column("State dict")
        table.add_column("Key", overflow="fold", min_width=min(40, max(len(c.key) for c in plan.changes)))
        table.add_column("Old shape")
        table.add_column("New shape")
        table.add_column("dtype")
        table.add_column("Operation", overflow="fold")
        for c in plan.changes:
            row = [escape(c.key), _shape(c.old_shape), _shape(c.new_shape), c.dtype, escape(c.detail)]
            if show_sd:
                row.insert(0, escape(_sd(c.state_dict)))
            table.add_row(*row)
        _out.print(table)
    m = plan.models[0]
    e = m.embedding
    plural = "" if e.prefix_rows == 1 else "s"
    rows = [
        ("family", escape(f"{plan.family} ({e.variant}, {e.prefix_rows} prefix row{plural})")),
        ("method", escape(f"{plan.method}: {plan.pos_convention.describe()}")),
        ("grid", f"{format_size(m.source.grid)} -> {format_size(m.target.grid)}"),
        ("patch", f"{format_size(m.source.patch)} -> {format_size(m.target.patch)}"),
        ("image size", f"{format_size(m.source.img_size)} -> {format_size(m.target.img_size)}"),
    ]
    if m.source.patch != m.target.patch:
        how = "PI-resize" if plan.patch_method == "pi" else "interpolation"
        rows.append(("patch kernel", f"{how}, {plan.patch_convention.describe()} basis"))
    if len(plan.models) > 1 or e.state_dict:
        rows.append(("converted", escape(", ".join(_sd(s) for s in plan.state_dicts))))
    rows.append(("passed through", f"{rep.passed_through} tensors, byte for byte"))
    dst = escape(str(rep.dst))
    if rep.dry_run:
        rows.append(("dry run", f"nothing written (would write {dst} as {rep.dst_format})"))
    else:
        rows.append(("wrote", f"{dst} ({rep.dst_format}, {_bytes(rep.bytes_written)})"))
    if rep.dst_format == "folder" and not rep.dry_run:
        rows.append(("rewritten", escape(", ".join(rep.rewritten))))
        rows.append(
            (
                "copied",
                escape(f"{len(rep.copied)} files as they are" + (f": {', '.join(rep.copied)}" if verbose else "")),
            )
        )
    if rep.verified is not None:
        v = rep.verified
        rows.append(
            ("verified", f"{v.tensors} pass-through tensors ({_bytes(v.bytes)}) identical to the input (SHA-256)")
        )
    if verbose:
        rows.append(("source", escape(f"{plan.src} ({plan.src_format}); grid from {e.geometry_from}")))
        if rep.engine is not None:
            how = "numpy, bit for bit as torch's CPU kernel; torch not imported" if rep.engine == "numpy" else "torch"
            rows.append(("resampled by", how))
        for other in plan.models[1:]:
            rows.append(("also", escape(f"{_sd(other.embedding.state_dict)}: {other.embedding.pos_key}")))
    _out.print(_summary(rows))


def left_out(rep: Report) -> None:
    """One line on stderr naming what the output format could not carry over."""
    if not rep.left_out:
        return
    if rep.dst_format == "safetensors":
        hint = "; write a .pth to keep them" + (
            ", or pick another state dict with --select" if len(rep.plan.state_dicts) > 1 else ""
        )
        what = f"left out of {rep.dst.name} (safetensors holds one flat state dict: {_sd(rep.written_state_dicts[0])})"
    else:
        hint = ""
        what = f"not carried into {rep.dst.name}"
    warning(f"{what}: {', '.join(rep.left_out)}{hint}")


def _embedding_rows(e: Embedding) -> list[str]:
    g = e.source
    return [
        escape(_sd(e.state_dict)),
        escape(f"{e.family} ({e.variant})"),
        escape(f"{e.pos_key} {_shape(e.pos_shape)}"),
        str(e.prefix_rows),
        f"{format_size(g.grid)} ({e.geometry_from})" if g else "?",
        escape(f"{e.patch_key} {_shape(e.patch_shape)}"),
        format_size(g.img_size) if g else "?",
        escape(", ".join(k for k in e.prefix_keys) or "-"),
    ]


def inspection(ins: Inspection) -> None:
    """What ``inspect`` found, on stdout."""
    rows = [
        ("file", escape(str(ins.path))),
        ("format", f"{ins.format} ({_bytes(ins.size_bytes)})"),
        ("family", escape(ins.family or "none found")),
    ]
    names = [_sd(s.name) for s in ins.state_dicts]
    nesting = ", ".join(names) + (f"  (+ {', '.join(ins.extras)})" if ins.extras else "")
    rows.append(("state dicts", escape(nesting)))
    for s in ins.state_dicts:
        dtypes = ", ".join(f"{d}: {n}" for d, n in sorted(s.dtypes.items()))
        rows.append((f"  {escape(_sd(s.name))}", f"{s.tensors} tensors, {s.parameters:,} parameters ({dtypes})"))
    if ins.metadata:
        rows.append(("metadata", escape(", ".join(f"{k}={v}" for k, v in sorted(ins.metadata.items())))))
    if ins.config:
        c = ins.config
        img = "x".join(map(str, c["img_size"])) if c["img_size"] else "?"
        patch = "x".join(map(str, c["patch"])) if c["patch"] else "?"
        rows.append(("config", escape(f"{c['path']} ({c['kind']}: image {img}, patch {patch})")))
    _out.print(_summary(rows))
    if ins.embeddings:
        table = Table(title="Position and patch embeddings", title_justify="left", header_style="bold")
        for col in (
            "State dict",
            "Family",
            "Position table",
            "Prefix rows",
            "Grid",
            "Patch kernel",
            "Image",
            "Prefix tokens",
        ):
            table.add_column(col, overflow="fold")
        for e in ins.embeddings:
            table.add_row(*_embedding_rows(e))
        _out.print(table)
    for e in ins.embeddings:
        if e.note:
            warning(e.note)
