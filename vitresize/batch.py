"""Many conversions from one manifest, in one process: :func:`read_manifest` and :func:`run`. Never prints, never
exits.

A manifest is JSON lines (one object per line) or CSV (a header row), one conversion per entry: ``src``, ``dst``
(relative to the manifest's folder) and :func:`vitresize.convert`'s options by name. The whole manifest is read
and checked before anything runs, so a typo on line 900 fails in a second, not after 899 conversions; then the
lines (of one shard, with ``shard``) are converted, ``jobs`` at a time, each atomically as ``convert`` does.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import api
from .errors import CheckpointFormatError, OutputExistsError, UsageError, VitresizeError, param
from .formats import ROOT, open_file, writer_for
from .formats._files import open_regular
from .formats._json import loads
from .keymaps import TensorInfo
from .options import EXECUTE_FIELDS, OPTIONS_FIELDS, TARGET_FIELDS, Options, Target
from .plans import Plan
from .report import JSON_SCHEMA_VERSION, Report

__all__ = ["MAX_MANIFEST_BYTES", "BatchReport", "Line", "LineResult", "Status", "parse_shard", "read_manifest", "run"]

MAX_MANIFEST_BYTES = 16 << 20
"""The largest manifest read (16 MiB, about 100,000 lines); anything bigger is refused unread."""

LINE_FIELDS = tuple(k for k in EXECUTE_FIELDS if k not in ("dry_run", "progress"))
"""The execute options a manifest line may set: ``force``, ``select``, ``verify``, ``fsync``."""
KEYS = ("src", "dst", *TARGET_FIELDS, *OPTIONS_FIELDS, *LINE_FIELDS)
"""Every key a manifest line may have."""
_BOOLS = frozenset({"antialias", "allow_large", *LINE_FIELDS} - {"select"})
_TEXTS = frozenset({"family", "method", "interpolation", "patch_method", "device", "select"})
_TRUE, _FALSE = frozenset({"true", "yes", "1"}), frozenset({"false", "no", "0"})
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")

Status = Literal["ok", "failed", "skipped", "not_run"]
"""What became of a line: converted, failed, skipped (``resume``: DST matches), not started (``fail_fast``)."""


@dataclass(frozen=True)
class Line:
    """One conversion of a manifest, checked.

    Attributes:
        number: the manifest's line number (1-based) where the entry starts.
        index: its place among the manifest's entries (0-based; what ``shard`` counts).
        src: the checkpoint, relative paths taken from the manifest's folder.
        dst: the output, likewise.
        target: the geometry, validated.
        options: how to resample, validated.
        force: overwrite DST (with ``resume``: convert again a DST that does not match).
        select, verify, fsync: as :func:`vitresize.convert` takes them.
    """

    number: int
    index: int
    src: Path
    dst: Path
    target: Target
    options: Options
    force: bool = False
    select: str | None = None
    verify: bool = False
    fsync: bool = False


@dataclass(frozen=True)
class LineResult:
    """What became of one line: its :class:`~vitresize.report.Report` (``ok``) or its error (``failed``)."""

    line: Line
    status: Status
    report: Report | None = None
    error: VitresizeError | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        e = self.error
        return {
            "line": self.line.number,
            "src": str(self.line.src),
            "dst": str(self.line.dst),
            "status": self.status,
            "result": self.report.to_dict() if self.report is not None else None,
            "error": None if e is None else {"type": type(e).__name__, "message": str(e), "exit_code": e.exit_code},
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class BatchReport:
    """What :func:`run` did: a :class:`LineResult` per line of the shard, in the manifest's order."""

    manifest: Path
    lines: tuple[LineResult, ...]
    entries: int
    """The entries of the whole manifest (every shard's)."""
    shard: tuple[int, int] | None
    jobs: int
    seconds: float

    @property
    def ok(self) -> bool:
        """Whether no line failed (skipped and not started lines are no failure)."""
        return all(r.status != "failed" for r in self.lines)

    @property
    def failed(self) -> tuple[LineResult, ...]:
        """The lines that failed, in order."""
        return tuple(r for r in self.lines if r.status == "failed")

    @property
    def counts(self) -> dict[str, int]:
        """``{"total", "ok", "failed", "skipped", "not_run"}``: lines of this shard by status."""
        counts = {"total": len(self.lines), "ok": 0, "failed": 0, "skipped": 0, "not_run": 0}
        for r in self.lines:
            counts[r.status] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": JSON_SCHEMA_VERSION,
            "command": "batch",
            "ok": self.ok,
            "manifest": str(self.manifest),
            "entries": self.entries,
            "shard": list(self.shard) if self.shard is not None else None,
            "jobs": self.jobs,
            "seconds": round(self.seconds, 3),
            "lines": [r.to_dict() for r in self.lines],
            "counts": self.counts,
        }


# The manifest --------------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike[str]) -> list[Line]:
    """Read and check a whole manifest: JSON lines (``.jsonl``, ``.ndjson``, ``.json``) or CSV (``.csv``), else
    told apart by its first entry (``{`` starts JSON).

    JSON lines: one object per line; blank lines and lines starting with ``#`` are skipped. CSV: a header row of
    keys, one row per conversion, an empty cell leaves its key unset; ``true``/``false`` (``yes``/``no``,
    ``1``/``0``) for flags. Keys: ``src``, ``dst`` (relative to the manifest's folder) and the fields of
    :class:`~vitresize.options.Target`, :class:`~vitresize.options.Options` and ``force``, ``select``,
    ``verify``, ``fsync``.

    Raises:
        UsageError: the manifest cannot be read (missing, not a regular file, over :data:`MAX_MANIFEST_BYTES`, not
            UTF-8), or an entry is not valid (an unknown key, a bad value, no ``src``, ``dst`` or target), or two
            entries write the same DST, or one reads what another writes; the message names the line.

    Example:
        >>> lines = vitresize.batch.read_manifest("manifest.jsonl")  # doctest: +SKIP
        >>> lines[0].target.img_size  # doctest: +SKIP
        (384, 384)
    """
    manifest = Path(path)
    text = _read_text(manifest)
    entries = _jsonl(manifest, text) if _is_jsonl(manifest, text) else _csv(manifest, text)
    lines = [_line(manifest, i, number, fields) for i, (number, fields) in enumerate(entries)]
    _check_apart(manifest, lines)
    return lines


def _read_text(manifest: Path) -> str:
    """The manifest's text: a regular file (never a FIFO), within :data:`MAX_MANIFEST_BYTES`, UTF-8 (a BOM is
    dropped: spreadsheets write one)."""
    try:
        with open_regular(manifest, fix="pass a manifest file (JSON lines or CSV)") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(MAX_MANIFEST_BYTES + 1) if size <= MAX_MANIFEST_BYTES else b""
    except CheckpointFormatError as e:
        raise UsageError(e.message.raw) from None
    except OSError as e:
        raise UsageError(f"cannot read {manifest}: {e.strerror or e}") from None
    if size > MAX_MANIFEST_BYTES or len(raw) > MAX_MANIFEST_BYTES:
        raise UsageError(
            f"{manifest} is {max(size, len(raw))} bytes, over the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may "
            f"have; split it into several manifests"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        number = raw.count(b"\n", 0, e.start) + 1
        raise UsageError(f"{manifest} line {number}: not UTF-8 text; save the manifest as UTF-8") from None


def _is_jsonl(manifest: Path, text: str) -> bool:
    suffix = manifest.suffix.lower()
    if suffix in _JSONL_SUFFIXES or suffix == ".csv":
        return suffix != ".csv"
    first = next((s for s in map(str.strip, text.split("\n")) if s and not s.startswith("#")), "")
    return first.startswith("{")


def _where(manifest: Path, number: int) -> str:
    return f"{manifest} line {number}"


class _Repeated(ValueError):
    """A JSON object with a key twice."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Repeated(k)
        out[k] = v
    return out


def _not_finite(literal: str) -> float:
    raise ValueError(f"{literal} is not a JSON number")


def _jsonl(manifest: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each entry of a JSON-lines manifest. Lines end at ``\n`` only (JSON strings may
    hold U+2028, which ``str.splitlines`` would split at)."""
    for number, raw in enumerate(text.split("\n"), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        at = _where(manifest, number)
        if stripped.startswith("["):
            raise UsageError(f"{at}: a JSON array; write one JSON object per line (JSON lines), not an array")
        try:
            value = loads(stripped, object_pairs_hook=_object, parse_constant=_not_finite)
        except _Repeated as e:
            raise UsageError(f"{at}: the key {str(e)!r} is given twice; keep one") from None
        except RecursionError:
            raise UsageError(f"{at}: nested too deeply; give one flat JSON object per line") from None
        except ValueError as e:
            raise UsageError(f"{at}: not valid JSON ({e}); give one JSON object per line") from None
        if not isinstance(value, dict):
            raise UsageError(f"{at}: not a JSON object; give one object per line")
        yield number, value


def _csv(manifest: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, values)`` of each row of a CSV manifest; empty cells left out, flags parsed."""
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    end = 0
    while True:
        number = end + 1
        try:
            row = next(rows, None)
        except csv.Error as e:
            raise UsageError(f"{_where(manifest, rows.line_num)}: not valid CSV ({e}); check its quotes") from None
        if row is None:
            return
        end = rows.line_num
        if not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        at = _where(manifest, number)
        if header is None:
            header = [cell.strip() for cell in row]
            _check_header(at, header)
            continue
        if len(row) != len(header):
            raise UsageError(f"{at}: {len(row)} cells, but the header has {len(header)}; give one cell per key")
        yield number, {k: _cell(at, k, v.strip()) for k, v in zip(header, row, strict=True) if v.strip()}


def _check_header(at: str, header: list[str]) -> None:
    for i, key in enumerate(header):
        if key in header[:i]:
            raise UsageError(f"{at}: the column {key!r} is given twice; keep one")
        _known(at, key)


def _known(at: str, key: str) -> None:
    if key not in KEYS:
        hint = key.replace("-", "_").lstrip("_")
        fix = f"did you mean {hint!r}? " if hint in KEYS else ""
        raise UsageError(f"{at}: unknown key {key!r}; {fix}the keys are {', '.join(KEYS)}")


def _cell(at: str, key: str, text: str) -> Any:
    """A CSV cell as the value of ``key``: flags as ``bool``, the rest as text (sizes are parsed by Target)."""
    if key not in _BOOLS:
        return text
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise UsageError(f"{at}: {key} {text!r} is not true or false; write true or false (or leave the cell empty)")


def _line(manifest: Path, index: int, number: int, fields: dict[str, Any]) -> Line:
    """One entry checked: every key known, every value valid, ``src``, ``dst`` and a target given."""
    at = _where(manifest, number)
    for key in fields:
        _known(at, key)
    given = {k: v for k, v in fields.items() if v is not None}
    for key in ("src", "dst"):
        value = given.get(key)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if value is None else f"{value!r}, not a path"
            raise UsageError(f"{at}: {key} is {got}; every line needs src and dst (paths, relative to the manifest)")
    for key in _BOOLS & given.keys():
        if type(given[key]) is not bool:
            raise UsageError(f"{at}: {key} {given[key]!r} is not true or false")
    for key in _TEXTS & given.keys():
        if not isinstance(given[key], str):
            raise UsageError(f"{at}: {key} {given[key]!r} is not a string")
    try:
        target = Target(**{k: v for k, v in given.items() if k in TARGET_FIELDS})
        options = Options(**{k: v for k, v in given.items() if k in OPTIONS_FIELDS})
    except UsageError as e:  # the API's names are the manifest's keys: img_size, not --img-size
        raise UsageError(f"{at}: {e}") from None
    if target.is_empty:
        raise UsageError(f"{at}: no target; set img_size, patch, grid or window")
    folder = manifest.parent
    return Line(
        number=number,
        index=index,
        src=folder / given["src"],
        dst=folder / given["dst"],
        target=target,
        options=options,
        **{k: given[k] for k in LINE_FIELDS if k in given},
    )


def _place(path: Path) -> Path:
    """Where a path points, for comparing lines: its folder's links resolved, not the file's own."""
    try:
        return path.parent.resolve() / path.name
    except (OSError, RuntimeError):
        return path.absolute()


def _check_apart(manifest: Path, lines: list[Line]) -> None:
    """No two lines write the same DST, and no line reads what another writes (lines run in any order: in
    parallel, and in shards on other machines)."""
    writes: dict[Path, Line] = {}
    for line in lines:
        other = writes.setdefault(_place(line.dst), line)
        if other is not line:
            raise UsageError(
                f"{_where(manifest, line.number)}: dst {line.dst} is written by line {other.number} too; give "
                f"each line its own dst"
            )
    for line in lines:
        writer = writes.get(_place(line.src))
        if writer is not None and writer is not line:  # a line may replace its own SRC (with force), as convert can
            raise UsageError(
                f"{_where(manifest, line.number)}: src {line.src} is the dst of line {writer.number}; lines run in "
                f"any order (in parallel, in shards), so convert from the original instead"
            )


def parse_shard(shard: str | tuple[int, int]) -> tuple[int, int]:
    """``"K/N"`` (or ``(K, N)``) as ``(K, N)``: the lines ``i`` with ``i % N == K`` are this shard's.

    Raises:
        UsageError: not two integers with ``0 <= K < N``.
    """
    if isinstance(shard, str):
        parts = [p.strip() for p in shard.split("/")]
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) < 10 for p in parts):
            raise UsageError(f"{param('shard')} {shard!r} is not K/N; write e.g. 0/4 (the first of 4 shards)")
        k, n = int(parts[0]), int(parts[1])
    elif isinstance(shard, tuple) and len(shard) == 2 and all(type(v) is int for v in shard):
        k, n = shard
    else:
        raise UsageError(f"{param('shard')} {shard!r} is not K/N or a (K, N) pair of ints")
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"{param('shard')} {k}/{n}: K must be 0 to N-1 (shards are counted from 0)")
    return k, n


# Running -------------------------------------------------------------------------------------------------------


def run(
    manifest: str | os.PathLike[str],
    *,
    jobs: int = 1,
    shard: str | tuple[int, int] | None = None,
    resume: bool = False,
    fail_fast: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> BatchReport:
    """Convert every line of a manifest (see :func:`read_manifest`), in one process.

    The whole manifest is checked first; then each line is planned and executed as :func:`vitresize.convert`
    does (atomically: a failed or interrupted line leaves no output). A line that fails is reported and, unless
    ``fail_fast``, the others still run.

    Args:
        manifest: the JSON-lines or CSV file.
        jobs: conversions run at a time (threads; the copies and torch run outside the GIL).
        shard: ``"K/N"`` or ``(K, N)``: run only the entries ``i`` (0-based) with ``i % N == K``, so that N
            machines (a Slurm array, a Kubernetes indexed Job) share one manifest with no coordinator.
        resume: skip a line whose DST exists and holds what the line would write (the same state dicts, keys,
            shapes and dtypes; for safetensors, the same provenance metadata); a DST that does not match is
            converted again with the line's ``force``, else the line fails.
        fail_fast: start no line after one has failed (those are reported ``not_run``).
        progress: called as ``progress(lines_done, lines_total)`` after each line, from the calling thread.

    Returns:
        A :class:`BatchReport`, one :class:`LineResult` per line of the shard in the manifest's order.

    Raises:
        UsageError: the manifest is not valid (nothing has run), or ``jobs`` or ``shard`` is.

    Example:
        >>> report = vitresize.batch.run("manifest.csv", jobs=2, shard="0/4")  # doctest: +SKIP
        >>> report.ok, report.counts["failed"]  # doctest: +SKIP
        (True, 0)
    """
    if type(jobs) is not int or jobs < 1:
        raise UsageError(f"{param('jobs')} {jobs!r} is not a number of conversions at a time; give 1 or more")
    picked = parse_shard(shard) if shard is not None else None
    lines = read_manifest(manifest)
    mine = [ln for ln in lines if picked is None or ln.index % picked[1] == picked[0]]
    start = time.perf_counter()
    results = _run_lines(mine, jobs=jobs, resume=resume, fail_fast=fail_fast, progress=progress)
    return BatchReport(
        manifest=Path(manifest),
        lines=tuple(results),
        entries=len(lines),
        shard=picked,
        jobs=jobs,
        seconds=time.perf_counter() - start,
    )


def _run_lines(
    lines: list[Line],
    *,
    jobs: int,
    resume: bool,
    fail_fast: bool,
    progress: Callable[[int, int], None] | None,
) -> list[LineResult]:
    """Each line's result, in order. One job runs in this thread (Ctrl-C stops the conversion under way);
    more run in worker threads, started as others finish, and Ctrl-C (or a bug) starts no more and waits for
    those under way."""
    done: dict[int, LineResult] = {}

    def record(i: int, result: LineResult) -> bool:
        """Keep a result; whether to go on starting lines."""
        done[i] = result
        if progress is not None:
            progress(len(done), len(lines))
        return not (fail_fast and result.status == "failed")

    if jobs == 1:
        for i, line in enumerate(lines):
            if not record(i, _convert_line(line, resume=resume)):
                break
    else:
        todo = iter(enumerate(lines))
        going = True
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="vitresize-batch") as pool:
            running: dict[Future[LineResult], int] = {}
            while True:
                while going and len(running) < jobs and (nxt := next(todo, None)) is not None:
                    running[pool.submit(_convert_line, nxt[1], resume=resume)] = nxt[0]
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=running.__getitem__):
                    going = record(running.pop(future), future.result()) and going
    return [done.get(i) or LineResult(line, "not_run") for i, line in enumerate(lines)]


def _convert_line(line: Line, *, resume: bool = False) -> LineResult:
    """Plan and execute one line (with ``resume``, skip it when its DST matches); its error, if it fails.

    Raises:
        InternalError: a bug in vitresize (like any exception that is not a
            :class:`~vitresize.errors.VitresizeError`, it is not turned into a failed line).
    """
    start = time.perf_counter()
    try:
        with api.plan(line.src, line.target, line.options) as p:
            if resume and os.path.lexists(line.dst):
                why = _mismatch(p, line.dst, select=line.select)
                if why is None:
                    return LineResult(line, "skipped", seconds=time.perf_counter() - start)
                if not line.force:
                    raise OutputExistsError(
                        f"{line.dst} exists but is not what this line writes ({why}); set force on the line to "
                        f"convert it again, or remove it"
                    )
            report = p.execute(line.dst, force=line.force, select=line.select, verify=line.verify, fsync=line.fsync)
    except VitresizeError as e:
        return LineResult(line, "failed", error=e, seconds=time.perf_counter() - start)
    return LineResult(line, "ok", report=report, seconds=time.perf_counter() - start)


# --resume ------------------------------------------------------------------------------------------------------


def _mismatch(plan: Plan, dst: str | os.PathLike[str], *, select: str | None = None) -> str | None:
    """How the existing ``dst`` differs from what ``plan.execute(dst, select=select)`` would write, read from
    shapes alone: ``None`` when it holds the same state dicts, keys, shapes and dtypes, and (safetensors) the same
    ``vitresize.*`` provenance metadata; else the first difference, in words.

    Raises:
        VitresizeError: the plan cannot write ``dst`` at all (a folder where a file goes, ``select`` unknown, ...).
    """
    out = Path(dst)
    dry = plan.execute(out, force=True, dry_run=True, select=select)
    assert plan.checkpoint is not None
    writer = writer_for(plan.checkpoint, out)
    want = _planned(plan, dry.written_state_dicts, whole=writer.whole_container)
    try:
        with open_file(out) as have:
            return _differs(want, have.state_dicts) or (
                _provenance_differs(plan, have.metadata) if have.format == "safetensors" else None
            )
    except VitresizeError as e:
        return f"it cannot be read: {e}"


def _planned(plan: Plan, written: tuple[str, ...], *, whole: bool) -> dict[str, dict[str, TensorInfo]]:
    """The state dicts the output would hold, as its reader lists them (a flat output's under ``ROOT``)."""
    ckpt = plan.checkpoint
    assert ckpt is not None
    new = {(c.state_dict, c.key): c.new_shape for c in plan.changes}

    def planned(sd: str) -> dict[str, TensorInfo]:
        return {k: TensorInfo(new.get((sd, k), info.shape), info.dtype) for k, info in ckpt.state_dicts[sd].items()}

    return {sd: planned(sd) for sd in written} if whole else {ROOT: planned(written[0])}


def _differs(want: dict[str, dict[str, TensorInfo]], have: dict[str, dict[str, TensorInfo]]) -> str | None:
    if set(want) != set(have):
        names = ", ".join(repr(s) for s in sorted(set(want) ^ set(have)))
        return f"its state dicts differ: {names}"
    for sd, infos in want.items():
        where = f" of {sd!r}" if sd else ""
        missing, extra = sorted(infos.keys() - have[sd].keys()), sorted(have[sd].keys() - infos.keys())
        if missing or extra:
            key, how = (missing[0], "missing") if missing else (extra[0], "not planned")
            return f"{len(missing)} key(s){where} missing, {len(extra)} not planned (first: {key}, {how})"
        for key, info in infos.items():
            got = have[sd][key]
            if got != info:
                return f"{key}{where} is {got.dtype} {list(got.shape)}, planned {info.dtype} {list(info.shape)}"
    return None


def _provenance_differs(plan: Plan, metadata: dict[str, str]) -> str | None:
    """The first ``vitresize.*`` metadata entry (but the version) that differs from what the plan would record."""
    from ._execute import provenance

    for key, value in provenance(plan).items():
        if key == "vitresize.version":
            continue
        got = metadata.get(key)
        if got != value:
            return f"its metadata {key} is {got!r}, planned {value!r}" if got is not None else f"it has no {key}"
    return None
