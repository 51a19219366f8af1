"""The output channel under hostile input and broken streams: usage errors as one line, control characters
escaped, stdout full, closed or a closed pipe, an ASCII-only encoding, stderr broken, sizes that are not sizes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, file_digest, fixture
from typer.testing import CliRunner

from vitresize import _render
from vitresize.cli import app
from vitresize.errors import UsageError
from vitresize.resample.geometry import MAX_SIZE, parse_size

SRC = fixture("timm_vit_cls.safetensors")  # 32x32 images, patch 8
EXE = Path(sys.executable).parent / "vitresize"
# Everything a terminal may act on: C0 but newline (line ends), DEL, C1.
RAW = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c != 0x0A]
HOSTILE = "m\x1b[2J\r\x07\x9b\x7f\u202e\n"
ESCAPED = "m\\x1b[2J\\r\\x07\\x9b\\x7f\\u202e\\n"  # HOSTILE as it must reach the terminal


def _invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line(stderr: str, prefix: str = "Error: ") -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix) and "Traceback" not in stderr
    return lines[0]


def _clean_bytes(text: str) -> None:
    assert not [c for c in RAW if c in text], repr(text)


def _run(
    *args: Any, exe: list[str] | None = None, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """``python -m vitresize ARGS`` in a subprocess; stdout/stderr captured unless given."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    cmd = [*(exe or [sys.executable, "-m", "vitresize"]), *map(str, args)]
    environ = {**os.environ, "COLUMNS": "200", **(env or {})}
    environ.pop("VITRESIZE_DEBUG", None)
    return subprocess.run(cmd, text=True, env=environ, cwd=ROOT, timeout=120, **kw)


def _close(fd: int) -> Callable[[], None]:
    return lambda: os.close(fd)


# 1. Click's usage errors: one line, exit 2.


@pytest.mark.parametrize(
    ("args", "needle", "where"),
    [
        (["convert", SRC, "o.safetensors", "--bogus"], "No such option: --bogus", "convert"),
        (["convert", SRC], "Missing argument", "convert"),
        (["convert", SRC, "o.safetensors", "--method", "nope"], "--method", "convert"),
        (["convert", SRC, "o.safetensors", "--family", "nope"], "--family", "convert"),
        (["convert", SRC, "o.safetensors", "--img-size"], "requires an argument", "convert"),
        (["convert", SRC, "o.safetensors", "extra", "--img-size", "48"], "extra argument", "convert"),
        (["inspect"], "Missing argument", "inspect"),
        (["nosuch"], "No such command", ""),
        (["--bogus"], "No such option", ""),
    ],
)
def test_usage_errors_are_one_line(args: list[Any], needle: str, where: str) -> None:
    res = _invoke(*args)
    assert res.exit_code == 2 and res.stdout == ""
    line = _one_line(res.stderr)
    assert needle in line and line.endswith(f"; see '{' '.join(['vitresize', where]).strip()} --help'"), line


@pytest.mark.parametrize("color", [{"NO_COLOR": "1"}, {}])
@pytest.mark.parametrize("exe", ["module", "script"])
def test_usage_errors_one_line_in_a_subprocess(exe: str, color: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | color
    cmd = [str(EXE)] if exe == "script" else None
    for args in (["convert", SRC, "o.safetensors", "--bogus"], ["convert", SRC, "o.safetensors", "--img-size"]):
        res = _run(*args, exe=cmd, env=env)
        assert res.returncode == 2 and res.stdout == ""
        assert "convert --help'" in _one_line(res.stderr)


def test_help_and_version_still_work() -> None:
    res = _invoke()
    assert res.exit_code == 2 and "Usage" in res.stdout and "convert" in res.stdout and res.stderr == ""
    for flag in ("--help", "-h"):
        res = _invoke(flag)
        assert res.exit_code == 0 and "inspect" in res.stdout
    res = _invoke("--version")
    assert res.exit_code == 0 and res.stdout.startswith("vitresize ")
    res = _run("-h")
    assert res.returncode == 0 and "Usage" in res.stdout and res.stderr == ""


# 2. Control characters from paths, keys and metadata are escaped everywhere.


def test_clean() -> None:
    assert _render.clean("a/b c.pth") == "a/b c.pth"
    assert _render.clean(HOSTILE) == ESCAPED
    assert _render.clean("\t\x00\x85\udcff é") == "\\t\\x00\\x85\\udcff é"
    for c in RAW:
        _clean_bytes(_render.clean(f"x{c}y"))


def test_newline_in_a_path_does_not_split_the_error(tmp_path: Path) -> None:
    res = _invoke("convert", tmp_path / "a\nb\x1b[2J.pth", tmp_path / "o.safetensors", "--img-size", "48")
    assert res.exit_code == 1
    assert "a\\nb\\x1b[2J.pth" in _one_line(res.stderr)
    res = _invoke("convert", SRC, tmp_path / "o\x07\n.txt", "--img-size", "48")
    assert res.exit_code == 2 and "o\\x07\\n.txt" in _one_line(res.stderr)
    res = _invoke("convert", SRC, tmp_path / "o.pth", "ex\ntra\x1b")
    assert res.exit_code == 2
    _clean_bytes(_one_line(res.stderr))


@pytest.fixture
def hostile(tmp_path: Path) -> dict[str, Path]:
    """A safetensors file whose keys and metadata carry control characters, and a .pth whose state dicts do."""
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(SRC))
    keys = tmp_path / f"keys{HOSTILE}.safetensors"
    save_file({HOSTILE + "." + k: v for k, v in sd.items()}, str(keys), metadata={"n\x1bote": "v\x07\n"})
    nest = tmp_path / f"nest{HOSTILE}.pth"
    torch.save({"model\x1b[31m\n": sd, "ema\x07": dict(sd)}, nest)  # two state dicts (one dict twice is one)
    return {"keys": keys, "nest": nest}


def test_tables_and_summaries_are_escaped(tmp_path: Path, hostile: dict[str, Path]) -> None:
    esc = ESCAPED
    res = _invoke("inspect", hostile["keys"])
    assert res.exit_code == 0, res.stderr
    _clean_bytes(res.stdout)
    assert f"keys{esc}.safetensors" in res.stdout and "n\\x1bote=v\\x07\\n" in res.stdout
    assert f"{esc}.pos_embed" in res.stdout.replace("│", "").replace(" ", "")  # the table may fold the key

    dst = tmp_path / f"o{HOSTILE}.safetensors"
    res = _invoke("convert", hostile["keys"], dst, "--img-size", "48", "-v")
    assert res.exit_code == 0 and dst.exists(), res.stderr
    _clean_bytes(res.stdout + res.stderr)
    assert f"{esc}.pos_embed" in res.stdout and f"o{esc}.safetensors" in res.stdout

    res = _invoke("convert", hostile["nest"], tmp_path / "n.safetensors", "--img-size", "48", "-v")
    assert res.exit_code == 0, res.stderr
    _clean_bytes(res.stdout + res.stderr)
    assert "model\\x1b[31m\\n" in res.stdout and "ema\\x07" in res.stdout
    assert "ema\\x07" in _one_line(res.stderr, "Warning: ")  # left out of the safetensors output

    res = _invoke("inspect", hostile["nest"])
    assert res.exit_code == 0
    _clean_bytes(res.stdout + res.stderr)
    assert "model\\x1b[31m\\n" in res.stdout


def test_json_stays_json(hostile: dict[str, Path]) -> None:
    import json

    res = _invoke("inspect", hostile["keys"], "--json")
    assert res.exit_code == 0 and res.stdout.count("\n") == 1
    _clean_bytes(res.stdout)
    assert json.loads(res.stdout)["models"][0]["pos_embed"]["key"] == HOSTILE + ".pos_embed"


# 3. Broken stdout and stderr, with real file descriptors.


def _convert(dst: Path, *extra: Any, **kw: Any) -> subprocess.CompletedProcess[str]:
    return _run("convert", SRC, dst, "--img-size", "48", *extra, env={"NO_COLOR": "1"}, **kw)


def test_stdout_full(tmp_path: Path) -> None:
    with open("/dev/full", "w") as full:
        for extra in ([], ["--json"]):
            dst = tmp_path / f"o{len(extra)}.safetensors"
            res = _convert(dst, *extra, stdout=full)
            assert res.returncode == 0 and dst.exists()
            line = _one_line(res.stderr, "Warning: ")
            assert "summary could not be printed" in line and "No space left" in line
        res = _convert(tmp_path / "dry.safetensors", "--dry-run", stdout=full)
        assert res.returncode == 1 and "cannot write to stdout: No space left" in _one_line(res.stderr)
        res = _run("inspect", SRC, stdout=full)
        assert res.returncode == 1 and "cannot write to stdout: No space left" in _one_line(res.stderr)
        res = _run("--version", stdout=full)
        assert res.returncode == 1 and "cannot write to stdout" in _one_line(res.stderr)


def test_stdout_closed(tmp_path: Path) -> None:
    ref = tmp_path / "ref.safetensors"
    assert _convert(ref, "-q").returncode == 0
    dst = tmp_path / "o.safetensors"
    res = _convert(dst, stdout=None, preexec_fn=_close(1))
    assert res.returncode == 0
    assert "cannot write to stdout: it is closed" in _one_line(res.stderr, "Warning: ")
    assert file_digest(dst) == file_digest(ref)  # nothing strayed into the output through fd 1
    res = _convert(tmp_path / "q.safetensors", "-q", stdout=None, preexec_fn=_close(1))
    assert res.returncode == 0 and res.stderr == ""
    res = _run("inspect", SRC, stdout=None, preexec_fn=_close(1))
    assert res.returncode == 1 and "cannot write to stdout: it is closed" in _one_line(res.stderr)
    res = _convert(tmp_path / "d.safetensors", stdout=subprocess.DEVNULL)
    assert res.returncode == 0 and res.stderr == ""


def test_stdout_closed_pipe(tmp_path: Path) -> None:
    """The reader has gone (``| head -c1``): nothing said; convert exits 0, inspect 1."""
    r, w = os.pipe()
    os.close(r)
    try:
        dst = tmp_path / "o.safetensors"
        res = _convert(dst, stdout=w)
        assert res.returncode == 0 and res.stderr == "" and dst.exists()
        res = _run("inspect", SRC, stdout=w)
        assert res.returncode == 1 and res.stderr == ""
    finally:
        os.close(w)


def test_ascii_stdout(tmp_path: Path) -> None:
    src = tmp_path / "vit_é.safetensors"
    shutil.copy(SRC, src)
    env = {"PYTHONIOENCODING": "ascii", "NO_COLOR": "1"}
    for args in (["inspect", src], ["convert", src, tmp_path / "o_é.safetensors", "--img-size", "48"]):
        res = _run(*args, env=env, stdout=subprocess.PIPE, encoding="ascii")
        assert res.returncode == 0 and res.stderr == "", res.stderr
        assert "_\\xe9.safetensors" in res.stdout and "+-" in res.stdout and "|" in res.stdout


def test_stderr_broken(tmp_path: Path) -> None:
    nest = fixture("deit_distilled.pth")  # two state dicts: writing .safetensors warns on stderr
    with open("/dev/full", "w") as full:
        res = _run("convert", nest, tmp_path / "a.safetensors", "--img-size", "48", stderr=full)
        assert res.returncode == 0 and "wrote" in res.stdout
        res = _run("convert", nest, tmp_path / "b.safetensors", "--img-size", "48", stderr=full, stdout=full)
        assert res.returncode == 0 and (tmp_path / "b.safetensors").exists()
        assert _run("inspect", tmp_path / "missing.pth", stderr=full).returncode == 1
        assert _run("convert", SRC, tmp_path / "c.safetensors", "--bogus", stderr=full).returncode == 2
    res = _run("convert", nest, tmp_path / "d.safetensors", "--img-size", "48", stderr=None, preexec_fn=_close(2))
    assert res.returncode == 0 and (tmp_path / "d.safetensors").exists()
    assert _run("inspect", tmp_path / "missing.pth", stderr=None, preexec_fn=_close(2)).returncode == 1


# 4. Sizes: ASCII digits only, capped, one line.


@pytest.mark.parametrize(
    ("text", "want"),
    [("384", (384, 384)), ("384x512", (384, 512)), ("384X512", (384, 512)), ("384×512", (384, 512)),
     (" 384 ", (384, 384)), (384, (384, 384)), ((2, 3), (2, 3)), ([2, 3], (2, 3)), (MAX_SIZE, (MAX_SIZE,) * 2)],
)  # fmt: skip
def test_parse_size_accepts(text: Any, want: tuple[int, int]) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize(
    "text",
    ["３８４", "٣٨٤", "1_000", " +384", "-384", "1e20", "384x", "0", "0x0", "9" * 4000, str(MAX_SIZE + 1),
     True, (2, True), 3.0, ("3", "4"), None, pytest.param(10**5000, id="huge"), (3, 4, 5)],
)  # fmt: skip
def test_parse_size_refuses(text: Any) -> None:
    with pytest.raises(UsageError) as e:
        parse_size(text, option="--img-size")
    message = str(e.value)
    assert "\n" not in message and len(message) < 200 and message.startswith("--img-size")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--img-size", "1e20"], "not a size"),
        (["--img-size", "9" * 4000], f"at most {MAX_SIZE}"),
        (["--grid", str(2**21)], f"at most {MAX_SIZE}"),
        (["--img-size", "３８４"], "ASCII digits"),
        (["--patch", "0"], "positive"),
        (["--patch", "0x0"], "positive"),
    ],
)
def test_bad_sizes_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    res = _invoke("convert", SRC, tmp_path / "o.safetensors", *args)
    assert res.exit_code == 2 and needle in _one_line(res.stderr)
    assert list(tmp_path.iterdir()) == []
