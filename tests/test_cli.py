"""The command line: streams, exit codes, JSON, errors as one line, start-up without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, file_digest, fixture, leftovers

import vitresize


def _py(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, **kw)


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from vitresize.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'timm', 'safetensors', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = _py("-c", code)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("args", [["convert", "--help"], ["inspect", "--help"], ["--version"]])
def test_usage_screens_do_not_import_torch(args: list[str]) -> None:
    code = (
        "import sys\nfrom vitresize.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    assert "TORCH False" in _py("-c", code).stdout


@pytest.mark.parametrize("flags", [["-q"], ["--json"]])
def test_quiet_safetensors_convert_loads_only_what_it_uses(tmp_path: Path, flags: list[str]) -> None:
    """A cloned ViT-g converts in about the time vitresize takes to start, so start-up is the conversion's cost:
    no torch, no pydantic (typer 0.29 builds a pydantic validator per option: the reason for ``typer<0.29``),
    no rich when nothing is shown, no reader or writer of another format, no ``--verify`` code."""
    dst = tmp_path / "o.safetensors"
    argv = ["vitresize", "convert", str(fixture("timm_vit_cls.safetensors")), str(dst), "--img-size", "48", *flags]
    code = (
        f"import sys\nsys.argv = {argv!r}\nfrom vitresize.cli import main\n"
        "try:\n    main()\nfinally:\n"
        "    unused = ('torch', 'pydantic', 'rich.console', 'zipfile', 'hashlib', 'vitresize.formats.torch_pickle',"
        " 'vitresize.formats.npz', 'vitresize.formats.folder', 'vitresize._verify')\n"
        "    print('LOADED', [m for m in unused if m in sys.modules], file=sys.stderr)\n"
    )
    out = _py("-c", code)
    assert out.returncode == 0 and dst.is_file(), out.stderr
    assert "LOADED []" in out.stderr, out.stderr


def test_python_m_and_version() -> None:
    out = _py("-m", "vitresize", "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"vitresize {vitresize.__version__}"
    out = _py("-m", "vitresize", "convert", "--help")
    assert out.returncode == 0 and "--img-size" in out.stdout and "Exit codes" in out.stdout


def test_console_script(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "vitresize"
    res = subprocess.run(
        [str(exe), "convert", str(fixture("timm_vit_cls.pth")), str(tmp_path / "o.safetensors"), "--img-size", "48"],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )
    assert res.returncode == 0, res.stderr
    assert "pos_embed" in res.stdout and "[1, 17, 16]" in res.stdout and "[1, 37, 16]" in res.stdout


def test_table_on_stdout_messages_on_stderr(run: Any, tmp_path: Path) -> None:
    res = run("convert", fixture("timm_vit_cls.pth"), tmp_path / "o.safetensors", "--img-size", "96", "--patch", "12")
    assert res.exit_code == 0
    for text in ("pos_embed", "patch_embed.proj.weight", "PI-resize", "timm", "4x4 -> 8x8", "8x8 -> 12x12", "passed"):
        assert text in res.stdout, text
    assert res.stderr == ""


def test_quiet(run: Any, tmp_path: Path) -> None:
    res = run("convert", fixture("timm_vit_cls.pth"), tmp_path / "o.safetensors", "--img-size", "48", "-q")
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == ""


def test_convert_json_schema(run: Any, tmp_path: Path) -> None:
    res = run("convert", fixture("timm_vit_reg4.safetensors"), tmp_path / "o.safetensors", "--img-size", "48", "--json")
    assert res.exit_code == 0
    assert res.stdout.count("\n") == 1
    rep = json.loads(res.stdout)
    assert rep["schema"] == 1 and rep["command"] == "convert"
    for key in (
        "src", "src_format", "dst", "dst_format", "family", "method", "interpolation", "antialias", "align_corners",
        "patch_method", "patch_basis", "device", "old_grid", "new_grid", "old_patch", "new_patch", "old_img_size",
        "new_img_size", "state_dicts", "models", "changes", "tensors", "passed_through", "bytes_written",
        "written_state_dicts", "left_out", "warnings", "dry_run",
    ):  # fmt: skip
        assert key in rep, key
    assert rep["family"] == "timm" and rep["method"] == "timm" and rep["antialias"] is True
    assert rep["old_grid"] == [4, 4] and rep["new_grid"] == [6, 6] and rep["new_img_size"] == [48, 48]
    assert rep["models"][0]["pos_embed"]["prefix_rows"] == 5 and rep["models"][0]["variant"] == "cls+4 reg"
    assert rep["changes"] == [
        {
            "state_dict": "",
            "key": "pos_embed",
            "old_shape": [1, 21, 16],
            "new_shape": [1, 41, 16],
            "dtype": "float32",
            "op": "pos_embed",
            "detail": "grid 4x4 -> 6x6",
        }
    ]
    assert rep["bytes_written"] == (tmp_path / "o.safetensors").stat().st_size


def test_inspect_text_and_json(run: Any) -> None:
    res = run("inspect", fixture("deit_distilled.pth"))
    assert res.exit_code == 0
    for text in (
        "torch-zip",
        "model_ema",
        "optimizer",
        "cls_token, dist_token",
        "4x4",
        "32x32",
        "patch_embed.proj.weight",
    ):
        assert text in res.stdout, text
    res = run("inspect", fixture("deit_distilled.pth"), "--json")
    info = json.loads(res.stdout)
    assert info["format"] == "torch-zip" and info["family"] == "timm"
    assert [s["name"] for s in info["state_dicts"]] == ["model", "model_ema"]
    assert info["extras"] == ["optimizer", "epoch", "args"]
    m = info["models"][0]
    assert m["pos_embed"] == {"key": "pos_embed", "shape": [1, 18, 16], "prefix_rows": 2}
    assert m["patch_embed"] == {"key": "patch_embed.proj.weight", "shape": [16, 3, 8, 8]}
    assert m["grid"] == [4, 4] and m["patch"] == [8, 8] and m["img_size"] == [32, 32]
    assert m["prefix_tokens"] == ["cls_token", "dist_token"]
    assert info["state_dicts"][0]["dtypes"] == {"float32": 23}
    assert info["parameters"] == 2 * info["state_dicts"][0]["parameters"]


def test_inspect_non_square_reports_instead_of_failing(run: Any) -> None:
    res = run("inspect", fixture("timm_vit_32x48.safetensors"), "--json")
    assert res.exit_code == 0
    m = json.loads(res.stdout)["models"][0]
    assert m["grid"] is None and "--from-img-size" in m["note"]
    res = run("inspect", fixture("timm_vit_32x48.safetensors"), "--from-img-size", "32x48", "--json")
    assert json.loads(res.stdout)["models"][0]["grid"] == [2, 3]


def test_inspect_no_embed_class_and_gap(run: Any) -> None:
    m = json.loads(run("inspect", fixture("timm_vit_no_embed_class.pth"), "--json").stdout)["models"][0]
    assert m["pos_embed"]["prefix_rows"] == 0 and "no_embed_class" in m["variant"]
    m = json.loads(run("inspect", fixture("timm_vit_gap.safetensors"), "--json").stdout)["models"][0]
    assert m["pos_embed"]["prefix_rows"] == 0 and m["prefix_tokens"] == [] and m["grid"] == [4, 4]


def _one_error_line(res: Any) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("Error: ") and "Traceback" not in res.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("make_args", "code", "needle"),
    [
        (lambda d: ["convert", d / "missing.pth", d / "o.pth", "--img-size", "48"], 1, "does not exist"),
        (lambda d: ["convert", fixture("resnet_no_vit.safetensors"), d / "o.pth", "--img-size", "48"], 1, "no ViT"),
        (
            lambda d: ["convert", fixture("timm_vit_32x48.safetensors"), d / "o.pth", "--img-size", "48"],
            1,
            "--from-img-size",
        ),
        (lambda d: ["convert", fixture("timm_vit_cls.pth"), d / "o.pth", "--img-size", "50"], 2, "not divisible"),
        (lambda d: ["convert", fixture("timm_vit_cls.pth"), d / "o.pth"], 2, "--img-size, --patch or --grid"),
        (lambda d: ["convert", fixture("timm_vit_cls.pth"), d / "o.pth", "--img-size", "4x4x4"], 2, "HxW"),
        (lambda d: ["convert", fixture("timm_vit_cls.pth"), d / "o.txt", "--img-size", "48"], 2, ".safetensors"),
        (
            lambda d: ["convert", fixture("timm_vit_cls.pth"), d / "o.pth", "--grid", "2x2", "--img-size", "48"],
            2,
            "--grid",
        ),
        (
            lambda d: ["convert", fixture("timm_vit_cls.pth"), d / "o.pth", "--patch", "8", "--select", "model"],
            2,
            "--select",
        ),
        (lambda d: ["convert", fixture("timm_vit_cls.pth"), d / "nope" / "o.pth", "--img-size", "48"], 1, "create it"),
        (
            lambda d: ["convert", fixture("timm_vit_cls.pth"), d / "o.pth", "--img-size", "48", "--device", "tpu"],
            2,
            "cpu",
        ),
        (lambda d: ["inspect", d], 1, "is a folder"),
        (lambda d: ["inspect", fixture("make_fixtures.py")], 1, "not a checkpoint"),
    ],
)
def test_errors_are_one_line(run: Any, tmp_path: Path, make_args: Any, code: int, needle: str) -> None:
    res = run(*make_args(tmp_path))
    assert res.exit_code == code, res.stderr
    assert needle in _one_error_line(res)
    assert res.stdout == ""
    assert [p for p in tmp_path.iterdir() if p.is_file()] == [] and leftovers(tmp_path) == []


def test_cuda_absent_is_a_clear_error(run: Any, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    res = run("convert", fixture("timm_vit_cls.pth"), tmp_path / "o.pth", "--img-size", "48", "--device", "cuda")
    assert res.exit_code == 1 and "--device cpu" in _one_error_line(res)


def test_empty_and_truncated_inputs(run: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pth"
    empty.touch()
    assert "is empty" in _one_error_line(run("inspect", empty))
    for name in ("timm_vit_cls.pth", "timm_vit_cls.safetensors", "timm_vit_legacy.pth"):
        cut = tmp_path / f"cut_{name}"
        data = fixture(name).read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        before = file_digest(cut)
        res = run("convert", cut, tmp_path / "o.safetensors", "--img-size", "48")
        assert res.exit_code == 1, res.stderr
        _one_error_line(res)
        assert file_digest(cut) == before and not (tmp_path / "o.safetensors").exists()


def test_debug_env_shows_traceback(run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITRESIZE_DEBUG", "1")
    res = run("inspect", tmp_path / "missing.pth")
    assert res.exit_code != 0 and isinstance(res.exception, vitresize.VitresizeError)


def test_paths_with_markup_are_escaped(run: Any, tmp_path: Path) -> None:
    folder = tmp_path / "[exp1]"
    folder.mkdir()
    res = run("convert", fixture("timm_vit_cls.pth"), folder / "o.safetensors", "--img-size", "48")
    assert res.exit_code == 0 and "[exp1]" in res.stdout


# Help at 80 columns, shell completion, contradictory flags (issue 12).


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VITRESIZE_DEBUG", "_VITRESIZE_COMPLETE")}
    return {**env, "NO_COLOR": "1", **extra}


@pytest.mark.parametrize("color", [{"NO_COLOR": "1"}, {}])
@pytest.mark.parametrize(("args", "usage"), [(["convert"], "SRC DST"), (["inspect"], "SRC"), ([], "COMMAND")])
def test_help_fits_80_columns(args: list[str], usage: str, color: dict[str, str]) -> None:
    env = {k: v for k, v in _cli_env(COLUMNS="80").items() if k != "NO_COLOR"} | color
    out = subprocess.run(
        [sys.executable, "-m", "vitresize", *args, "--help"], capture_output=True, text=True, env=env, cwd=ROOT
    )  # a pipe, not a terminal: no colour codes either way
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    assert [line for line in lines if len(line) > 80] == []
    assert "\x1b" not in out.stdout
    (line,) = [line for line in lines if "Usage:" in line]
    assert f"[OPTIONS] {usage}" in line and "{" not in line, line
    assert "<bool>" not in out.stdout and "BOOLEAN" not in out.stdout and "<str>" not in out.stdout
    rows: list[int] = []  # lines each option, argument or command takes in its panel
    for line in lines:
        if line.startswith("│ ") and line[2] != " ":
            rows.append(1)
        elif line.startswith("│  ") and line.strip("│ ") and rows:
            rows[-1] += 1
    assert rows and max(rows) <= 3, rows  # at most two lines of help, and one of [default: ...] or [required]
    if args == ["convert"]:  # every method is named (in the Methods epilog); value options show their metavar
        from vitresize.cli import Method

        for m in Method:
            assert m.value in out.stdout, m.value
        for opt, metavar in [("--img-size", "N|HxW"), ("--grid", "HxW"), ("--method", "METHOD"), ("--force", "")]:
            (row,) = [line for line in lines if f"│ {opt} " in line]
            assert metavar in row, row
    if args == []:
        assert "--install-completion" in out.stdout and "--show-completion" in out.stdout


def _complete(words: str, exe: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Bash completion for WORDS through the env-var protocol the installed script uses (``<TAB>`` at the end)."""
    env = _cli_env(_VITRESIZE_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(len(words.split(" ")) - 1))
    if exe is None:  # main() in-process, reporting whether torch got imported
        code = (
            "import sys\nsys.argv = ['vitresize']\nfrom vitresize.cli import main\n"
            "try:\n    main()\nfinally:\n    print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
        )
        exe = [sys.executable, "-c", code]
    return subprocess.run(exe, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def test_completion_of_command_names_in_the_console_script() -> None:
    exe = str(Path(sys.executable).parent / "vitresize")
    res = _complete("vitresize conv", exe=[exe])
    assert res.returncode == 0 and res.stderr == "" and res.stdout.split() == ["convert"], res
    env = _cli_env(_VITRESIZE_COMPLETE="source_bash")
    res = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and "_VITRESIZE_COMPLETE=complete_bash" in res.stdout
    assert "complete -o default -F _vitresize_completion vitresize" in res.stdout


def test_completion_of_choices_without_torch() -> None:
    from vitresize.cli import Family, Method

    methods, families = [m.value for m in Method], [f.value for f in Family]
    commands = ["convert", "inspect", "check", "batch"]
    for words, expected in [
        ("vitresize ", commands),
        ("vitresize --version ", commands),  # the eager --version callback prints nothing here
        ("vitresize convert a.pth b.pth --method ", methods),
        ("vitresize convert a.pth b.pth --method dinov", [m for m in methods if m.startswith("dinov")]),
        ("vitresize inspect a.pth --family hf", [f for f in families if f.startswith("hf")]),
        ("vitresize convert a.pth b.pth --interpolation b", ["bicubic", "bilinear"]),
    ]:
        res = _complete(words)
        assert res.returncode == 0 and res.stdout.split() == expected, (words, res)
        assert res.stderr.strip() == "TORCH False", (words, res.stderr)
    assert {"dinov2", "dinov2-reg"} <= set(methods) and {"hf", "hf-clip"} <= set(families)


@pytest.mark.parametrize("flags", [["--json", "-q"], ["--quiet", "--json"]])
def test_json_with_quiet_is_a_usage_error(run: Any, tmp_path: Path, flags: list[str]) -> None:
    res = run("convert", fixture("timm_vit_cls.pth"), tmp_path / "o.safetensors", "--img-size", "48", *flags)
    assert res.exit_code == 2 and res.stdout == ""
    line = _one_error_line(res)
    assert "--json" in line and "-q/--quiet" in line, line
    assert list(tmp_path.iterdir()) == []
    res = run("inspect", fixture("timm_vit_cls.pth"), "--json", "-q")  # inspect has no --quiet
    assert res.exit_code == 2 and res.stdout == "" and "No such option: -q" in _one_error_line(res)


def test_tables_name_the_flag_the_grid_came_from(run: Any, tmp_path: Path) -> None:
    """Where the grid came from is shown as the flag in the inspect table and the verbose convert table."""
    src = fixture("timm_vit_32x48.safetensors")
    res = run("inspect", src, "--from-grid", "2x3")
    assert res.exit_code == 0 and "(--from-grid)" in res.stdout and "from_grid" not in res.stdout
    res = run("convert", src, tmp_path / "o.safetensors", "--from-grid", "2x3", "--grid", "4x6", "-v")
    assert res.exit_code == 0 and "grid from --from-grid" in res.stdout, res.stdout
