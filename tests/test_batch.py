"""``vitresize batch``: manifests (JSON lines, CSV) checked whole before anything runs, outputs identical to
separate conversions, failed lines among good ones, shards, ``--resume``, ``--jobs``, the JSON report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, fixture, leftovers

import vitresize
from vitresize import UsageError
from vitresize.batch import parse_shard, read_manifest, run

LINES: list[dict[str, Any]] = [
    {"src": "in/timm_vit_cls.pth", "dst": "out/a.safetensors", "img_size": 48},
    {"src": "in/timm_vit_cls.safetensors", "dst": "out/b.safetensors", "img_size": "48", "patch": 4},
    {"src": "in/hf_vit", "dst": "out/c", "img_size": [40, 48]},
    {"src": "in/timm_vit_cls.pth", "dst": "out/d.pth", "grid": "3x5", "method": "torchvision", "verify": True},
]
"""Four conversions of the tiny fixtures: pth and safetensors in, safetensors, a model folder and pth out."""


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """``tmp_path`` with the fixtures under ``in/`` and empty ``out/`` and ``ref/`` folders."""
    (tmp_path / "in").mkdir()
    for name in ("timm_vit_cls.pth", "timm_vit_cls.safetensors"):
        shutil.copy(fixture(name), tmp_path / "in" / name)
    shutil.copytree(fixture("families/hf_vit"), tmp_path / "in" / "hf_vit")
    (tmp_path / "out").mkdir()
    (tmp_path / "ref").mkdir()
    return tmp_path


def _jsonl(path: Path, lines: list[dict[str, Any]], *extra: str) -> Path:
    path.write_text("\n".join(["# made by test_batch", *extra, *(json.dumps(x) for x in lines)]) + "\n")
    return path


def _reference(work: Path, line: dict[str, Any]) -> Path:
    """The line converted on its own by vitresize.convert, into ref/ under the same name."""
    fields = {k: v for k, v in line.items() if k not in ("src", "dst")}
    if isinstance(fields.get("img_size"), list):
        fields["img_size"] = tuple(fields["img_size"])
    dst = work / "ref" / Path(line["dst"]).name
    vitresize.convert(work / line["src"], dst, **fields)
    return dst


def _contents(path: Path) -> dict[str, bytes]:
    """A file's bytes, or every file's bytes in a folder, by relative name."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _same_outputs(work: Path, lines: list[dict[str, Any]]) -> None:
    for line in lines:
        out, ref = work / line["dst"], work / "ref" / Path(line["dst"]).name
        if not ref.exists():
            _reference(work, line)
        assert _contents(out) == _contents(ref), line["dst"]


def _stderr_line(res: Any) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    return lines[0]


def test_jsonl_outputs_and_json_are_those_of_convert(run: Any, work: Path) -> None:
    manifest = _jsonl(work / "m.jsonl", LINES, "", "   ")
    res = run("batch", manifest, "--json")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.count("\n") == 1
    d = json.loads(res.stdout)
    assert {k: d[k] for k in ("schema", "command", "ok", "entries", "shard", "jobs")} == {
        "schema": 1,
        "command": "batch",
        "ok": True,
        "entries": 4,
        "shard": None,
        "jobs": 1,
    }
    assert d["counts"] == {"total": 4, "ok": 4, "failed": 0, "skipped": 0, "not_run": 0}
    assert [x["line"] for x in d["lines"]] == [4, 5, 6, 7]  # the file's line numbers: comment and blanks count
    assert all(set(x) == {"line", "src", "dst", "status", "result", "error", "seconds"} for x in d["lines"])
    _same_outputs(work, LINES)
    # each result is convert --json's object for the same conversion (only DST differs: out/ vs ref/)
    first = d["lines"][0]
    assert (first["src"], first["dst"]) == (str(work / LINES[0]["src"]), str(work / LINES[0]["dst"]))
    conv = run("convert", work / LINES[0]["src"], work / "ref" / "a2.safetensors", "--img-size", "48", "--json")
    want = json.loads(conv.stdout)
    assert {**first["result"], "dst": None} == {**want, "dst": None}
    assert d["lines"][3]["result"]["verified"]["identical"] is True
    assert leftovers(work / "out") == []


def test_csv_manifest_with_empty_cells_and_two_jobs(run: Any, work: Path) -> None:
    csv_lines = [
        "src,dst,img_size,patch,grid,method,verify,antialias",
        "in/timm_vit_cls.pth,out/a.safetensors,48,,,,,",
        "# a comment row",
        "",
        'in/timm_vit_cls.safetensors,out/b.safetensors,"48",4,,,false,',
        "in/hf_vit,out/c,40x48,,,,,",
        "in/timm_vit_cls.pth,out/d.pth,,,3x5,torchvision,true,",
    ]
    manifest = work / "m.csv"
    manifest.write_text("\ufeff" + "\n".join(csv_lines) + "\n")  # a spreadsheet's BOM
    lines = read_manifest(manifest)
    assert [ln.number for ln in lines] == [2, 5, 6, 7] and [ln.index for ln in lines] == [0, 1, 2, 3]
    assert lines[1].verify is False and lines[3].verify is True and lines[3].options.method == "torchvision"
    assert lines[2].target.img_size == (40, 48) and lines[0].target.patch is None
    res = run("batch", manifest, "--jobs", "2")
    assert res.exit_code == 0, res.stderr
    for text in ("Line", "a.safetensors", "ok", "grid 4x4 -> 6x6", "4 ok of 4", "2 at a time"):
        assert text in res.stdout, text
    _same_outputs(work, LINES)


def test_a_failing_line_keep_going_and_fail_fast(run: Any, work: Path) -> None:
    lines = [LINES[0], {"src": "in/missing.pth", "dst": "out/x.safetensors", "img_size": 48}, LINES[1]]
    manifest = _jsonl(work / "m.jsonl", lines)
    res = run("batch", manifest, "--json")
    assert res.exit_code == 1
    d = json.loads(res.stdout)
    assert [x["status"] for x in d["lines"]] == ["ok", "failed", "ok"] and d["ok"] is False
    err = d["lines"][1]["error"]
    assert err["type"] == "CheckpointFormatError" and err["exit_code"] == 1 and "missing.pth" in err["message"]
    assert d["lines"][1]["result"] is None
    assert '1 of 3 lines failed (line 3); see the JSON\'s "lines"' in _stderr_line(res)
    assert (work / "out/b.safetensors").exists() and not (work / "out/x.safetensors").exists()

    for p in (work / "out").iterdir():
        p.unlink()
    res = run("batch", manifest, "--fail-fast", "--json")
    assert res.exit_code == 1
    d = json.loads(res.stdout)
    assert [x["status"] for x in d["lines"]] == ["ok", "failed", "not_run"]
    assert d["counts"] == {"total": 3, "ok": 1, "failed": 1, "skipped": 0, "not_run": 1}
    assert not (work / "out/b.safetensors").exists()  # never started

    (work / "out/a.safetensors").unlink()
    res = run("batch", manifest, "-q")  # quiet: each failure as one line, nothing on stdout
    assert res.exit_code == 1 and res.stdout == ""
    assert "line 3 (" in _stderr_line(res) and "missing.pth does not exist" in res.stderr


def test_shards_cover_every_line_once(work: Path) -> None:
    lines = [
        {"src": "in/timm_vit_cls.safetensors", "dst": f"out/{i}.safetensors", "img_size": 32 + 8 * i} for i in range(7)
    ]
    manifest = _jsonl(work / "m.jsonl", lines)
    seen: list[int] = []
    for k in range(3):
        rep = run(manifest, shard=f"{k}/3")
        assert rep.ok and rep.shard == (k, 3) and rep.entries == 7
        assert [r.line.index % 3 for r in rep.lines] == [k] * len(rep.lines)
        seen += [r.line.index for r in rep.lines]
    assert sorted(seen) == list(range(7))
    assert sorted(p.name for p in (work / "out").iterdir()) == sorted(f"{i}.safetensors" for i in range(7))
    assert parse_shard((2, 3)) == parse_shard(" 2 / 3 ") == (2, 3)
    empty = run(manifest, shard="0/1", resume=True)  # everything done already: every line skipped
    assert [r.status for r in empty.lines] == ["skipped"] * 7


@pytest.mark.parametrize("shard", ["3/3", "1", "-1/3", "a/b", "0/0", "1/2/3"])
def test_bad_shards(run: Any, work: Path, shard: str) -> None:
    manifest = _jsonl(work / "m.jsonl", LINES[:1])
    res = run("batch", manifest, "--shard", shard)
    assert res.exit_code == 2 and "--shard" in _stderr_line(res)
    assert not (work / "out/a.safetensors").exists()


def test_resume_skips_matching_outputs_and_redoes_or_refuses_others(work: Path) -> None:
    manifest = _jsonl(work / "m.jsonl", LINES)
    assert run(manifest).ok
    outs = [work / ln["dst"] for ln in LINES]
    mtimes = [p.stat().st_mtime_ns for p in outs]
    rep = run(manifest, resume=True, jobs=2)
    assert [r.status for r in rep.lines] == ["skipped"] * 4 and rep.ok
    assert [p.stat().st_mtime_ns for p in outs] == mtimes

    # a.safetensors at another size (shapes differ), b.safetensors by another method (shapes agree, metadata not)
    vitresize.convert(work / LINES[0]["src"], outs[0], img_size=64, force=True)
    vitresize.convert(work / LINES[1]["src"], outs[1], img_size=48, patch=4, method="torchvision", force=True)
    rep = run(manifest, resume=True)
    assert [r.status for r in rep.lines] == ["failed", "failed", "skipped", "skipped"]
    why = [str(r.error) for r in rep.lines[:2]]
    assert "exists but is not what this line writes" in why[0] and "pos_embed" in why[0] and "force" in why[0]
    assert "vitresize.method is 'torchvision', planned 'timm'" in why[1]

    forced = [{**ln, "force": True} for ln in LINES]
    _jsonl(manifest, forced)
    rep = run(manifest, resume=True)
    assert [r.status for r in rep.lines] == ["ok", "ok", "skipped", "skipped"]
    _same_outputs(work, LINES)


def test_progress_and_api_report(work: Path) -> None:
    manifest = _jsonl(work / "m.jsonl", LINES[:2])
    calls: list[tuple[int, int]] = []
    rep = run(manifest, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]
    assert rep.lines[0].report is not None and rep.lines[0].report.plan.changes[0].key == "pos_embed"
    d = rep.to_dict()
    assert d["lines"][0]["result"]["command"] == "convert" and d["manifest"] == str(manifest)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"src": "a.pth", "dst": "b.safetensors", "img-size": 48}',
            "line 2: unknown key 'img-size'; did you mean 'img_size'",
        ),
        ('{"src": "a.pth", "dst": "b.safetensors", "img_size": "big"}', "line 2: img_size 'big' is not a size"),
        ('{"src": "a.pth", "dst": "b.safetensors", "img_size": true}', "line 2: img_size True is not a size"),
        ('{"dst": "b.safetensors", "img_size": 48}', "line 2: src is missing"),
        ('{"src": "a.pth", "dst": 3, "img_size": 48}', "line 2: dst is 3, not a path"),
        ('{"src": "a.pth", "dst": "b.safetensors"}', "line 2: no target"),
        ('{"src": "a.pth", "dst": "b.safetensors", "img_size": 48, "force": "yes"}', "line 2: force 'yes' is not true"),
        (
            '{"src": "a.pth", "dst": "b.safetensors", "img_size": 48, "method": "nope"}',
            "line 2: method 'nope' is not one of",
        ),
        (
            '{"src": "a.pth", "dst": "b.safetensors", "img_size": 48, "img_size": 64}',
            "line 2: the key 'img_size' is given twice",
        ),
        ('{"src": "a.pth", "dst": "b.safetensors", "img_size": NaN}', "line 2: not valid JSON"),
        ('{"src": "a.pth", "dst": "b.safetensors", "img_size": 48', "line 2: not valid JSON"),
        ('["a.pth", "b.safetensors"]', "line 2: a JSON array"),
        ('"a.pth"', "line 2: not a JSON object"),
        ('{"src": "a.pth", "dst": "x.safetensors", "img_size": 48}', "line 2: dst "),
        ('{"src": "x.safetensors", "dst": "c.safetensors", "img_size": 48}', "line 2: src "),
    ],
)
def test_manifest_errors_are_one_line_with_the_line_number(run: Any, work: Path, text: str, message: str) -> None:
    manifest = work / "m.jsonl"
    first = '{"src": "in/timm_vit_cls.pth", "dst": "x.safetensors", "img_size": 48}'
    manifest.write_text(f"{first}\n{text}\n")
    res = run("batch", manifest)
    assert res.exit_code == 2 and res.stdout == ""
    line = _stderr_line(res)
    assert f"{manifest} {message}" in line, line
    assert "--img-size" not in line and "--force" not in line  # the manifest's keys, not the flags
    assert not (work / "x.safetensors").exists() and not (work / "b.safetensors").exists()  # nothing ran
    with pytest.raises(UsageError, match="line 2"):
        read_manifest(manifest)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("src,dst,img_size,colour\na,b.safetensors,48,red\n", "line 1: unknown key 'colour'"),
        ("src,dst,img_size,src\na,b.safetensors,48,c\n", "line 1: the column 'src' is given twice"),
        ("src,dst,img_size\na,b.safetensors\n", "line 2: 2 cells, but the header has 3"),
        ("src,dst,img_size,verify\na,b.safetensors,48,maybe\n", "line 2: verify 'maybe' is not true or false"),
        ("src,dst,img_size\n\n\na,b.safetensors,48x\n", "line 4: img_size '48x' is not a size"),
        ('src,dst,img_size\na,"b.safetensors,48\n', "line 2: not valid CSV"),
    ],
)
def test_csv_errors(run: Any, work: Path, text: str, message: str) -> None:
    manifest = work / "m.csv"
    manifest.write_text(text)
    res = run("batch", manifest)
    assert res.exit_code == 2 and f"{manifest} {message}" in _stderr_line(res)


def test_manifest_file_errors(run: Any, work: Path) -> None:
    res = run("batch", work / "none.jsonl")
    assert res.exit_code == 2 and "none.jsonl does not exist" in _stderr_line(res)
    fifo = work / "fifo.jsonl"
    os.mkfifo(fifo)
    res = run("batch", fifo)  # refused without blocking
    assert res.exit_code == 2 and "named pipe" in _stderr_line(res)
    bad = work / "bad.csv"
    bad.write_bytes(b"src,dst,img_size\n\xff,b.safetensors,48\n")
    res = run("batch", bad)
    assert res.exit_code == 2 and "line 2: not UTF-8" in _stderr_line(res)
    res = run("batch", work / "none.jsonl", "--jobs", "0")
    assert res.exit_code == 2 and "--jobs 0" in _stderr_line(res)
    res = run("batch", work / "none.jsonl", "--json", "-q")
    assert res.exit_code == 2


def test_sniffed_format_and_relative_manifest(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (work / "jobs").mkdir()
    _jsonl(
        work / "jobs" / "list.txt", [{"src": "../in/timm_vit_cls.pth", "dst": "../out/a.safetensors", "img_size": 48}]
    )
    (work / "jobs" / "list2.txt").write_text("src,dst,img_size\n../in/timm_vit_cls.pth,../out/e.safetensors,48\n")
    monkeypatch.chdir(work)
    assert run("jobs/list.txt").ok and run(Path("jobs/list2.txt")).ok
    assert (work / "out/e.safetensors").read_bytes() == (work / "out/a.safetensors").read_bytes()
    _same_outputs(work, LINES[:1])


def test_ctrl_c_stops_and_leaves_no_partial_output(run: Any, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitresize.batch as batch

    manifest = _jsonl(work / "m.jsonl", LINES[:2])
    real = batch._convert_line
    calls = []

    def interrupted(line: Any, **kw: Any) -> Any:
        calls.append(line.number)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(line, **kw)

    monkeypatch.setattr(batch, "_convert_line", interrupted)
    res = run("batch", manifest)
    assert res.exit_code == 130 and "interrupted" in _stderr_line(res)
    assert (work / "out/a.safetensors").exists() and not (work / "out/b.safetensors").exists()
    assert leftovers(work / "out") == []


def test_batch_help_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom vitresize.cli import app\n"
        "try:\n    app(['batch', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "TORCH False" in out.stdout and "SLURM_ARRAY_TASK_ID" in out.stdout and "JOB_COMPLETION_INDEX" in out.stdout


def test_line_ends_crlf_and_unicode_line_separators(work: Path) -> None:
    jsonl = work / "m.jsonl"
    entry = {"src": "in/timm_vit_cls.pth", "dst": "out/a\u2028b.safetensors", "img_size": 48}
    jsonl.write_bytes(("# x\r\n" + json.dumps(entry, ensure_ascii=False) + "\r\n\r\n").encode())
    (line,) = read_manifest(jsonl)
    assert line.number == 2 and line.dst.name == "a\u2028b.safetensors"
    csv_file = work / "m.csv"
    csv_file.write_bytes(
        b'src,dst,img_size\r\n"in/timm_vit_cls.pth","out/x\r\ny.safetensors",48\r\nin/a.pth,out/z.pth,40\r\n'
    )
    first, second = read_manifest(csv_file)
    assert (first.number, second.number) == (2, 4) and first.dst.name == "x\r\ny.safetensors"
