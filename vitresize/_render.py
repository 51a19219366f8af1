"""Everything the CLI shows: tables and summaries on stdout, messages on stderr, JSON. The only rich user.

rich is imported where something is rendered with it, not with this module: a ``--json`` or ``-q`` run that has
nothing to warn about never loads it (~20 ms of a start-up that, for a cloned ViT-g, is the whole conversion).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

from .plans import Embedding
from .report import Inspection, Report

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .batch import BatchReport, LineResult
    from .fidelity.results import CheckReport
from .resample.geometry import format_size

__all__ = [
    "StdoutError",
    "batch_report",
    "check_report",
    "clean",
    "count_progress",
    "error",
    "info",
    "inspection",
    "json_out",
    "left_out",
    "line_out",
    "progress",
    "report",
    "warning",
]


def clean(text: object) -> str:
    """``text`` safe to show on a terminal: every non-printable character as its Python escape, the rest as is.

    Newline, CR, tab, ESC, BEL, DEL, C1 controls (``\\x80``-``\\x9f``), bidi overrides and lone surrogates (from
    undecodable file names) become ``\\n``, ``\\r``, ``\\t``, ``\\x1b``, ``\\x07``, ``\\x7f``, ``\\x9b``,
    ``\\u202e``, ``\\udcff``: a path or tensor key can neither split a line nor drive the terminal. Every string
    this module prints goes through it (JSON is escaped by ``json.dumps`` already).
    """
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


def _markup(text: object) -> str:
    """User text for a rich markup string: cleaned, and ``[`` not read as a tag (``/data/[exp1]/ckpt.pth``)."""
    from rich.markup import escape

    return escape(clean(text))


def _cell(text: object) -> Text:
    """A table cell: cleaned plain text, never markup."""
    from rich.text import Text

    return Text(clean(text))


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def _discard(stream: Any) -> None:
    """After a failed write, point the stream's descriptor at /dev/null: what is still buffered would fail again
    when Python flushes it at exit ("Exception ignored ..." and exit status 120)."""
    with contextlib.suppress(Exception):
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)


@functools.cache
def _console_class() -> type[Console]:
    from rich.console import Console

    class _Console(Console):
        """A console whose closed pipe is an exception for the caller to judge: rich's own points stdout (even
        for a console on stderr) at /dev/null and exits with status 1."""

        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return _Console


def _console(**kwargs: Any) -> Console:
    """A rich console (``rich.console.Console``'s arguments) that raises on a closed pipe."""
    return _console_class()(**kwargs)


def _err_console() -> Console:
    return _console(stderr=True, highlight=False, soft_wrap=True)


class StdoutError(Exception):
    """stdout could not take the output: closed, on a full device, a closed pipe, or an encoding error.

    ``str(err)`` is ``cannot write to stdout: <why>``; ``broken_pipe`` says the reader went away (``| head``).
    """

    def __init__(self, reason: str, *, broken_pipe: bool = False) -> None:
        super().__init__(f"cannot write to stdout: {clean(reason)}")
        self.broken_pipe = broken_pipe


@contextlib.contextmanager
def _plain_stdout() -> Iterator[TextIO]:
    """stdout, for writes whose failures come out as StdoutError.

    An encoding that is not UTF (``PYTHONIOENCODING=ascii``) gets backslash escapes for the characters it cannot
    encode, instead of an error.
    """
    out = sys.stdout
    if out is None:  # started with stdout closed (>&-)
        raise StdoutError("it is closed")
    encoding = (getattr(out, "encoding", None) or "utf-8").lower().replace("-", "")
    try:
        if not encoding.startswith("utf") and isinstance(out, io.TextIOWrapper) and out.errors == "strict":
            out.reconfigure(errors="backslashreplace")
        yield out
    except (OSError, UnicodeEncodeError) as e:
        _discard(out)
        reason = (e.strerror if isinstance(e, OSError) else None) or str(e)
        raise StdoutError(reason, broken_pipe=isinstance(e, BrokenPipeError)) from e


@contextlib.contextmanager
def _stdout() -> Iterator[Console]:
    """A console on stdout, made per call (a failed print leaves rich's buffer full); failures as StdoutError.
    A stdout that is not UTF gets ASCII table boxes from rich (and escapes, as :func:`_plain_stdout`)."""
    with _plain_stdout() as out:
        # Piped output (CI logs) gets a wide console instead of rich's 80 columns, so keys and shapes never wrap.
        yield _console(highlight=False, width=None if _isatty(out) or "COLUMNS" in os.environ else 160)


def _say(markup: str) -> None:
    """One line on stderr. Best effort: with stderr closed, full or a closed pipe there is nowhere left to tell."""
    try:
        _err_console().print(markup)
    except (OSError, ValueError):
        _discard(sys.stderr)


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


def line_out(text: str) -> None:
    """One line of plain text on stdout (cleaned).

    Raises:
        StdoutError: stdout is closed or broken.
    """
    with _plain_stdout() as out:
        out.write(clean(text) + "\n")
        out.flush()


def _cli(message: str) -> str:
    """A message as the command line says it: a :class:`~vitresize.errors.Message` names parameters by flag."""
    return getattr(message, "cli", message)


def _cli_values(data: Any) -> Any:
    """``data`` with every :class:`~vitresize.errors.Message` in it as the command line says it."""
    if isinstance(data, dict):
        return {k: _cli_values(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_cli_values(v) for v in data]
    return _cli(data) if isinstance(data, str) else data


def json_out(data: dict[str, Any]) -> None:
    """One compact JSON object on stdout (``json.dumps`` escapes every control character); messages in it
    name the command line's flags.

    Raises:
        StdoutError: stdout is closed or broken.
    """
    with _plain_stdout() as out:
        out.write(json.dumps(_cli_values(data), separators=(",", ":")) + "\n")
        out.flush()


def error(message: str) -> None:
    """One ``Error:`` line on stderr (never wrapped, user text escaped)."""
    _say(f"[bold red]Error:[/] {_markup(_cli(message))}")


def warning(message: str) -> None:
    _say(f"[yellow]Warning:[/] {_markup(_cli(message))}")


def info(message: str) -> None:
    _say(f"[dim]{_markup(_cli(message))}[/]")


PROGRESS_MIN_BYTES = 256 * 1024 * 1024


@contextlib.contextmanager
def progress(size: int, *, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A transient progress bar on stderr for big inputs when stderr is a terminal; else ``None``."""
    err = _err_console() if enabled and size >= PROGRESS_MIN_BYTES else None
    if err is None or not err.is_terminal:
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
        console=err,
        transient=True,
    )
    task = bar.add_task("write", total=size)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _summary(rows: list[tuple[str, str]]) -> Table:
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for k, v in rows:
        grid.add_row(_cell(k), _cell(v))
    return grid


def report(rep: Report, *, verbose: bool = False) -> None:
    """The table of changed tensors and the summary of a conversion, on stdout.

    Raises:
        StdoutError: stdout is closed or broken.
    """
    from rich.table import Table

    plan = rep.plan
    table = None
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
            row = [c.key, _shape(c.old_shape), _shape(c.new_shape), c.dtype, c.detail]
            if show_sd:
                row.insert(0, _sd(c.state_dict))
            table.add_row(*(_cell(x) for x in row))
    m = plan.models[0]
    e = m.embedding
    plural = "" if e.prefix_rows == 1 else "s"
    rows_text = f", {e.prefix_rows} prefix row{plural}" if e.pos_key is not None else ""
    old_grid = format_size(m.source.grid if e.grid_known else None)
    new_grid = format_size(m.target.grid if m.target.grid != (0, 0) else None)
    rows = [
        ("family", f"{plan.family} ({e.variant}{rows_text}); positions: {e.scheme_text}"),
        ("method", f"{plan.method}: {plan.pos_convention.describe()}"),
        ("grid", f"{old_grid} -> {new_grid}"),
    ]
    if e.window is not None or m.window is not None:
        rows.append(("window", f"{format_size(e.window)} -> {format_size(m.window)}"))
    if e.stride_known:
        rows.append(("patch", f"{format_size(m.source.patch)} -> {format_size(m.target.patch)}"))
        new_img = m.target.img_size if m.target.grid != (0, 0) else None
        rows.append(("image size", f"{format_size(e.img_size)} -> {format_size(new_img)}"))
    else:  # a CNN stem whose stride the checkpoint does not state: only the grid is known
        rows.append(("patch", f"? (the stride of {e.stem}; kernel {format_size(e.kernel)})"))
        rows.append(("image size", "? -> ? (the grid times the stem's stride)"))
    if m.source.patch != m.target.patch:
        how = "PI-resize" if plan.patch_method == "pi" else "interpolation"
        rows.append(("patch kernel", f"{how}, {plan.patch_convention.describe()} basis"))
    if len(plan.models) > 1 or e.state_dict:
        rows.append(("converted", ", ".join(_sd(s) for s in plan.state_dicts)))
    rows.append(("passed through", f"{rep.passed_through} tensors, byte for byte"))
    dst = str(rep.dst)
    if rep.dry_run:
        rows.append(("dry run", f"nothing written (would write {dst} as {rep.dst_format})"))
    else:
        rows.append(("wrote", f"{dst} ({rep.dst_format}, {_bytes(rep.bytes_written)})"))
    if rep.dst_format == "folder" and not rep.dry_run:
        rows.append(("rewritten", ", ".join(rep.rewritten)))
        rows.append(
            (
                "copied",
                f"{len(rep.copied)} files and folders as they are" + (f": {', '.join(rep.copied)}" if verbose else ""),
            )
        )
    if rep.cloned_bytes:
        rows.append(("cloned", f"{_bytes(rep.cloned_bytes)} shared with the source (copy-on-write), not copied"))
    if rep.verified is not None:
        v = rep.verified
        rows.append(
            ("verified", f"{v.tensors} pass-through tensors ({_bytes(v.bytes)}) identical to the input (SHA-256)")
        )
    if verbose:
        rows.append(("source", f"{plan.src} ({plan.src_format}); grid from {_cli(e.geometry_from)}"))
        if rep.engine is not None:
            how = "numpy, bit for bit as torch's CPU kernel; torch not imported" if rep.engine == "numpy" else "torch"
            rows.append(("resampled by", how))
        for other in plan.models[1:]:
            rows.append(("also", f"{_sd(other.embedding.state_dict)}: {other.embedding.anchor_key}"))
    with _stdout() as out:
        if table is not None:
            out.print(table)
        out.print(_summary(rows))


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
        _sd(e.state_dict),
        f"{e.family} ({e.variant})",
        f"{e.pos_key} {_shape(e.pos_shape)}" if e.pos_key and e.pos_shape else f"none: {e.scheme_text}",
        str(e.prefix_rows) if e.pos_key else "-",
        f"{format_size(g.grid)} ({_cli(e.geometry_from)})" if g and e.grid_known else "?",
        f"{e.patch_key} {_shape(e.patch_shape)}"
        + (
            f"; patch {format_size(g.patch)} (its stem's stride)"
            if g and e.kernel != g.patch and e.stride_known
            else ""
        ),
        format_size(e.img_size) if e.img_size else "?",
        ", ".join(k for k in e.prefix_keys) or "-",
    ]


def inspection(ins: Inspection) -> None:
    """What ``inspect`` found, on stdout.

    Raises:
        StdoutError: stdout is closed or broken.
    """
    from rich.table import Table

    rows = [
        ("file", str(ins.path)),
        ("format", f"{ins.format} ({_bytes(ins.size_bytes)})"),
        ("family", ins.family or "none found"),
    ]
    names = [_sd(s.name) for s in ins.state_dicts]
    nesting = ", ".join(names) + (f"  (+ {', '.join(ins.extras)})" if ins.extras else "")
    rows.append(("state dicts", nesting))
    for s in ins.state_dicts:
        dtypes = ", ".join(f"{d}: {n}" for d, n in sorted(s.dtypes.items()))
        rows.append((f"  {_sd(s.name)}", f"{s.tensors} tensors, {s.parameters:,} parameters ({dtypes})"))
    if ins.metadata:
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in sorted(ins.metadata.items()))))
    if ins.config:
        c = ins.config
        img = "x".join(map(str, c["img_size"])) if c["img_size"] else "?"
        patch = "x".join(map(str, c["patch"])) if c["patch"] else "?"
        rows.append(("config", f"{c['path']} ({c['kind']}: image {img}, patch {patch})"))
    table = None
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
            table.add_row(*(_cell(x) for x in _embedding_rows(e)))
    with _stdout() as out:
        out.print(_summary(rows))
        if table is not None:
            out.print(table)
    for e in ins.embeddings:
        if e.note:
            warning(e.note)


@contextlib.contextmanager
def count_progress(what: str, *, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A transient progress bar counting items (``check``'s images) on stderr when it is a terminal."""
    err = _err_console() if enabled else None
    if err is None or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True
    )
    task = bar.add_task(what, total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}%"


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def check_report(rep: CheckReport, *, verbose: bool = False) -> None:
    """The agreement table and the verdict of ``check``, on stdout.

    Raises:
        StdoutError: stdout is closed or broken.
    """
    from rich.table import Table

    o, c = rep.original, rep.converted
    rows = [
        (
            "original",
            f"{o.path}: {o.family}, image {format_size(o.img_size)}, patch {format_size(o.patch)}, "
            f"grid {format_size(o.grid)}",
        ),
        (
            "converted",
            f"{c.path}: image {format_size(c.img_size)}, patch {format_size(c.patch)}, grid {format_size(c.grid)}",
        ),
        ("model", o.architecture.describe()),
        ("load", f"original: {o.load.describe()}; converted: {c.load.describe()}"),
        ("images", f"{rep.images} from {rep.image_source}" + (f", {len(rep.skipped)} skipped" if rep.skipped else "")),
    ]
    table = None
    if rep.candidates:
        table = Table(title="Agreement with the original", title_justify="left", header_style="bold")
        for col in ("Conversion", "Top-1 agree", "Top-5 overlap", "KL", "Cosine (pooled)", "Cosine (patches)"):
            table.add_column(col, justify="left" if col == "Conversion" else "right")
        for cand in rep.candidates:
            s = cand.scores
            label = {"converted": "CONVERTED", "reference": "reference (vitresize default)"}.get(cand.name, cand.name)
            if s is None:
                table.add_row(_cell(label), _cell(f"n/a: {cand.note}"), "", "", "", "")
                continue
            table.add_row(
                _cell(label),
                _pct(s.top1_agreement),
                _pct(s.top5_overlap),
                _fmt(s.kl),
                _fmt(s.cosine_pooled),
                _fmt(s.cosine_patch),
            )
    after = []
    if verbose:
        for one in rep.per_image:
            agree = "" if one.agree is None else ("agree, " if one.agree else "DISAGREE, ")
            after.append(("image", f"{one.image}: {agree}cosine {_fmt(one.cosine_pooled)} / {_fmt(one.cosine_patch)}"))
    for g in rep.gates:
        after.append(("gate", f"{'pass' if g.ok else 'FAIL'}: {g.text}"))
    after.append(("verdict", "ok" if rep.ok else "FAILED"))
    with _stdout() as out:
        out.print(_summary(rows))
        if table is not None:
            out.print(table)
        out.print(_summary(after))


def _batch_detail(r: LineResult) -> str:
    """What a batch line did, in a few words: the geometry it moved, or why it failed."""
    if r.status == "failed":
        return str(r.error)
    if r.status == "skipped":
        return "DST exists and matches (--resume)"
    if r.status == "not_run" or r.report is None:
        return "not started (--fail-fast)"
    rep = r.report
    m = rep.plan.models[0]
    parts = [f"grid {format_size(m.source.grid if m.embedding.grid_known else None)} -> {format_size(m.target.grid)}"]
    if m.source.patch != m.target.patch:
        parts.append(f"patch {format_size(m.source.patch)} -> {format_size(m.target.patch)}")
    parts.append(f"{len(rep.plan.changes)} changed, {rep.passed_through} passed through")
    parts.append(f"{rep.dst_format}, {_bytes(rep.bytes_written)}")
    return "; ".join(parts)


def batch_report(rep: BatchReport) -> None:
    """The table of a batch's lines (line, SRC, DST, status, what it did) and its summary, on stdout.

    Raises:
        StdoutError: stdout is closed or broken.
    """
    from rich.table import Table

    table = Table(header_style="bold")
    table.add_column("Line", justify="right")
    table.add_column("SRC", overflow="fold")
    table.add_column("DST", overflow="fold")
    table.add_column("Status")
    table.add_column("Result", overflow="fold")
    for r in rep.lines:
        status = r.status.replace("_", " ")
        table.add_row(*(_cell(x) for x in (r.line.number, r.line.src, r.line.dst, status, _batch_detail(r))))
    counts = rep.counts
    done = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in ("ok", "failed", "skipped", "not_run") if counts[k])
    scope = f"of {counts['total']}"
    if rep.shard is not None:
        scope += f" (shard {rep.shard[0]}/{rep.shard[1]} of the manifest's {rep.entries} entries)"
    rows = [
        ("manifest", str(rep.manifest)),
        ("lines", f"{done or 'none'} {scope}"),
        ("time", f"{rep.seconds:.1f} s, {rep.jobs} at a time"),
    ]
    with _stdout() as out:
        if rep.lines:
            out.print(table)
        out.print(_summary(rows))
