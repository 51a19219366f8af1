"""Trust at the edges: paths that overlap, links, special files and hostile folders, modes, JSON budgets."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, ROOT, fixture

from vitresize.errors import CheckpointFormatError
from vitresize.formats import MAX_JSON_BYTES, MAX_JSON_DEPTH, read_json

HF_VIT = FIXTURES / "families" / "hf_vit"


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _model(parent: Path, name: str = "model") -> Path:
    """A copy of the HF ViT folder (32px, patch 8: ``--img-size 48`` converts it)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(HF_VIT, parent / name))


def _state(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed, special files not opened): a hash, a link target or a kind."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"-> {p.readlink()}"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = stat.filemode(st.st_mode)[0]
    return out


def _leftovers(root: Path) -> list[Path]:
    return [
        Path(d) / n
        for d, dirs, files in os.walk(root)
        for n in dirs + files
        if ".vitresize-tmp" in n or ".vitresize-old" in n
    ]


def _one_error(res: Any, code: int, *needles: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == code, (res.exit_code, res.stderr, res.exception)
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return str(lines[0])


def _cli(*args: Any, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess: a regression that blocks on a FIFO fails with a timeout, not a hung suite."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "vitresize", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def _one_error_sub(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code, (res.returncode, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---- 1. paths: DST holding SRC, inside SRC, through links; dangling links; long names ------------------------


@pytest.mark.parametrize("up", [1, 2])
def test_folder_dst_above_src_is_refused_and_deletes_nothing(run: Any, tmp_path: Path, up: int) -> None:
    src = _model(tmp_path / "p" / "q")
    (tmp_path / "p" / "keep.txt").write_text("mine")
    dst = src.parents[up - 1]
    before = _state(tmp_path)
    res = run("convert", src, dst, "--img-size", "48", "--force")
    _one_error(res, 2, str(dst), "above SRC")
    assert _state(tmp_path) == before and _leftovers(tmp_path) == []


def test_folder_dst_inside_src_is_refused(run: Any, tmp_path: Path) -> None:
    src = _model(tmp_path)
    before = _state(tmp_path)
    for dst, *flags in ((src / "resized",), (src / "deeper" / "resized",), (src / "resized", "--dry-run")):
        res = run("convert", src, dst, "--img-size", "48", *flags)
        _one_error(res, 2, "inside the input folder")
        assert _state(tmp_path) == before and _leftovers(tmp_path) == []


@pytest.mark.parametrize("up", [1, 2])
def test_file_dst_above_src_is_refused(run: Any, tmp_path: Path, up: int) -> None:
    src = _model(tmp_path / "p") / "model.safetensors"
    dst = src.parents[up - 1]
    before = _state(tmp_path)
    res = run("convert", src, dst, "--img-size", "48", "--force")
    _one_error(res, 2, "above SRC")
    assert _state(tmp_path) == before


def test_dst_reached_through_a_symlink_is_refused(run: Any, tmp_path: Path) -> None:
    src = _model(tmp_path / "p")
    (tmp_path / "to_src").symlink_to(src)
    (tmp_path / "to_parent").symlink_to(tmp_path / "p")
    before = _state(tmp_path)
    for dst, needle in (
        (tmp_path / "to_src" / "resized", "inside the input folder"),  # through a link in the path
        (tmp_path / "to_parent", "above SRC"),  # DST itself a link to SRC's parent
    ):
        res = run("convert", src, dst, "--img-size", "48", "--force")
        _one_error(res, 2, needle)
        assert _state(tmp_path) == before and _leftovers(tmp_path) == []
    res = run("convert", src / "model.safetensors", tmp_path / "to_parent", "--img-size", "48", "--force")
    _one_error(res, 2, "above SRC")
    assert _state(tmp_path) == before
    # SRC given through a link: the folder holding the link is above SRC as written.
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "model").symlink_to(src)
    before = _state(tmp_path)
    res = run("convert", tmp_path / "q" / "model", tmp_path / "q", "--img-size", "48", "--force")
    _one_error(res, 2, "above SRC")
    assert _state(tmp_path) == before


def test_dst_equal_to_src_still_converts_in_place(run: Any, tmp_path: Path) -> None:
    src = _model(tmp_path)
    res = run("convert", src, src, "--img-size", "48", "--force")
    assert res.exit_code == 0, res.stderr
    assert json.loads((src / "config.json").read_text())["image_size"] == 48
    f = src / "model.safetensors"
    res = run("convert", f, f, "--img-size", "64", "--force")
    assert res.exit_code == 0, res.stderr
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("folder", [False, True])
def test_dangling_symlink_dst_exists_and_force_replaces_the_link(run: Any, tmp_path: Path, folder: bool) -> None:
    src = _model(tmp_path) if folder else fixture("timm_vit_cls.safetensors")
    dst = tmp_path / ("out" if folder else "out.safetensors")
    nowhere = tmp_path / "elsewhere" / "target"
    (tmp_path / "elsewhere").mkdir()
    dst.symlink_to(nowhere)
    res = run("convert", src, dst, "--img-size", "48")
    _one_error(res, 1, "already exists", "link")
    assert dst.is_symlink()
    res = run("convert", src, dst, "--img-size", "48", "--force")
    assert res.exit_code == 0, res.stderr
    assert not dst.is_symlink() and (dst.is_dir() if folder else dst.is_file())
    assert not nowhere.exists() and _leftovers(tmp_path) == []


def test_symlink_to_a_folder_as_dst_is_replaced_and_its_target_kept(run: Any, tmp_path: Path) -> None:
    src = _model(tmp_path)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "old.txt").write_text("old")
    dst = tmp_path / "out"
    dst.symlink_to(kept)
    res = run("convert", src, dst, "--img-size", "48", "--force")
    assert res.exit_code == 0, res.stderr
    assert dst.is_dir() and not dst.is_symlink() and (dst / "model.safetensors").is_file()
    assert (kept / "old.txt").read_text() == "old"
    assert _leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["kept", "model", "out"]


def test_failed_swap_puts_the_old_folder_back(run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    src = _model(tmp_path)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    real_rename = Path.rename

    def rename(self: Path, target: Any) -> Any:
        if self.name.endswith(".vitresize-tmp"):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    res = run("convert", src, dst, "--img-size", "48", "--force")
    _one_error(res, 1, "Input/output error")
    assert sorted(p.name for p in dst.iterdir()) == ["old.txt"] and _leftovers(tmp_path) == []


@pytest.mark.parametrize("folder", [False, True])
def test_dst_names_near_the_limit_work(run: Any, tmp_path: Path, folder: bool) -> None:
    src = _model(tmp_path) if folder else fixture("timm_vit_cls.safetensors")
    name = "é" * 60 + "x" * (255 - 120 - (0 if folder else 12)) + ("" if folder else ".safetensors")
    assert len(name.encode()) == 255
    res = run("convert", src, tmp_path / name, "--img-size", "48")
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / name).exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("folder", [False, True])
def test_dst_name_over_the_limit_is_one_line(run: Any, tmp_path: Path, folder: bool) -> None:
    src = _model(tmp_path) if folder else fixture("timm_vit_cls.safetensors")
    name = "x" * 300 + ("" if folder else ".safetensors")
    res = run("convert", src, tmp_path / name, "--img-size", "48")
    _one_error(res, 2, "shorter")
    res = run("convert", src, tmp_path / name / "o.safetensors", "--img-size", "48")
    assert res.exit_code in (1, 2) and len(res.stderr.strip().splitlines()) == 1, res.stderr


# ---- 2. non-regular SRC: never opened for a blocking read -----------------------------------------------------


def test_fifo_as_src_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    _one_error_sub(_cli("inspect", fifo), 1, str(fifo), "named pipe")
    _one_error_sub(_cli("convert", fifo, tmp_path / "o.safetensors", "--img-size", "48"), 1, "named pipe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_character_device_as_src_is_refused(run: Any, device: str) -> None:
    if not Path(device).exists():
        pytest.skip(f"no {device}")
    _one_error(run("inspect", device), 1, device, "character device")


def test_socket_as_src_is_refused(run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a short relative name: socket paths are limited to ~100 bytes
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("sock.pth")
        _one_error(run("inspect", tmp_path / "sock.pth"), 1, "sock.pth is a socket")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "model.safetensors.index.json"])
def test_fifo_inside_a_model_folder_is_refused_without_blocking(tmp_path: Path, name: str) -> None:
    src = _model(tmp_path)
    if name.endswith(".index.json"):
        (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    else:
        (src / name).unlink()
    os.mkfifo(src / name)
    _one_error_sub(_cli("inspect", src), 1, name, "named pipe")
    _one_error_sub(_cli("convert", src, tmp_path / "out", "--img-size", "48"), 1, name, "named pipe")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_fifo_config_beside_a_weights_file_is_refused_without_blocking(tmp_path: Path) -> None:
    src = _model(tmp_path)
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")
    _one_error_sub(_cli("inspect", src / "model.safetensors"), 1, "config.json", "named pipe")


# ---- 3. hostile folders: only regular files inside are copied; hub cache snapshots are followed ------------


def _hostile(kind: str, src: Path, outside: Path) -> Path:
    """Add one hostile entry to ``src``; returns its path."""
    if kind == "link to a file outside":
        (src / "README.md").symlink_to(outside / "secret.txt")
        return src / "README.md"
    if kind == "link to a folder outside":
        (src / "data").symlink_to(outside)
        return src / "data"
    if kind == "link to /dev/zero":
        (src / "tokenizer.json").symlink_to("/dev/zero")
        return src / "tokenizer.json"
    if kind == "dangling link":
        (src / "README.md").symlink_to("missing.md")
        return src / "README.md"
    if kind == "link inside to a folder":
        (src / "sub").mkdir()
        (src / "sub" / "loop").symlink_to("..")
        return src / "sub" / "loop"
    sub = src / "sub"
    sub.mkdir()
    if kind == "fifo in a subfolder":
        os.mkfifo(sub / "pipe")
        return sub / "pipe"
    if kind == "link out of a subfolder":
        (sub / "notes.txt").symlink_to(outside / "secret.txt")
        return sub / "notes.txt"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "link to a file outside",
        "link to a folder outside",
        "link to /dev/zero",
        "dangling link",
        "link inside to a folder",
        "fifo in a subfolder",
        "link out of a subfolder",
    ],
)
def test_hostile_entries_in_a_folder_are_refused(tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    src = _model(tmp_path)
    bad = _hostile(kind, src, outside)
    before = _state(tmp_path)
    dst = tmp_path / "out"
    res = _cli("convert", src, dst, "--img-size", "48", "--force")
    _one_error_sub(res, 1, str(bad), "remove it")
    assert _state(tmp_path) == before and not dst.exists() and _leftovers(tmp_path) == []


def test_socket_in_a_subfolder_is_refused(run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _model(tmp_path)
    (src / "sub").mkdir()
    monkeypatch.chdir(src / "sub")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("sock")
        res = run("convert", src, tmp_path / "out", "--img-size", "48")
    _one_error(res, 1, "sub/sock is a socket", "remove it")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_device_in_a_folder_is_refused(run: Any, tmp_path: Path) -> None:
    src = _model(tmp_path)
    try:
        os.mknod(src / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot create a device node here: {e}")
    res = run("convert", src, tmp_path / "out", "--img-size", "48")
    _one_error(res, 1, "zero", "character device", "remove it")
    assert not (tmp_path / "out").exists()


def test_subfolders_are_copied_as_regular_files(run: Any, tmp_path: Path) -> None:
    src = _model(tmp_path)
    (src / "README.md").write_text("read me")
    (src / "docs").mkdir()
    (src / "docs" / "empty").mkdir()
    (src / "docs" / "readme").symlink_to("../README.md")  # a link that stays inside: copied as its file
    (src / "LICENSE").symlink_to("README.md")
    (src / "assets").mkdir()
    res = run("convert", src, tmp_path / "out", "--img-size", "48", "--json")
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "out"
    for p in (out / "docs" / "readme", out / "LICENSE"):
        assert not p.is_symlink() and p.read_text() == "read me"
    assert (out / "docs" / "empty").is_dir()
    assert (out / "assets").is_dir()
    assert json.loads(res.stdout)["files"]["copied"] == ["LICENSE", "README.md", "assets/", "docs/"]


def test_hub_cache_snapshot_links_to_its_blobs_are_followed(run: Any, tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--vit"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in HF_VIT.iterdir():
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / sha)
        (snap / f.name).symlink_to(f"../../blobs/{sha}")
    before = _state(tmp_path)
    res = run("convert", snap, tmp_path / "out", "--img-size", "48")
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "out"
    assert all(not p.is_symlink() and p.is_file() for p in out.iterdir())
    assert json.loads((out / "config.json").read_text())["image_size"] == 48
    assert {k: v for k, v in _state(tmp_path).items() if not k.startswith("out")} == before
    # A link of the snapshot that leads anywhere but its own blobs/ is still refused.
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snap / "README.md").symlink_to("../../refs/main")
    _one_error(run("convert", snap, tmp_path / "out2", "--img-size", "48"), 1, "README.md", "outside")


def test_outputs_keep_their_sources_permissions(run: Any, tmp_path: Path, umask_022: None) -> None:
    src = _model(tmp_path)
    (src / "README.md").write_text("read me")
    (src / "sub").mkdir()
    (src / "sub" / "notes").write_text("notes")
    modes = {"model.safetensors": 0o600, "config.json": 0o640, "README.md": 0o604, "sub/notes": 0o600}
    for name, mode in modes.items():
        (src / name).chmod(mode)
    (src / "sub").chmod(0o710)
    src.chmod(0o750)
    out = tmp_path / "out"
    res = run("convert", src, out, "--img-size", "48")
    assert res.exit_code == 0, res.stderr
    got = {name: stat.S_IMODE((out / name).stat().st_mode) for name in modes}
    assert got == modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o750 and stat.S_IMODE((out / "sub").stat().st_mode) == 0o710
    # A single-file output: the source's bits, never wider (0o600 stays 0o600; the umask still applies).
    f = src / "model.safetensors"
    res = run("convert", f, tmp_path / "one.safetensors", "--img-size", "48")
    assert res.exit_code == 0, res.stderr
    assert stat.S_IMODE((tmp_path / "one.safetensors").stat().st_mode) == 0o600
    f.chmod(0o666)
    res = run("convert", f, tmp_path / "two.pth", "--img-size", "48")
    assert res.exit_code == 0, res.stderr
    assert stat.S_IMODE((tmp_path / "two.pth").stat().st_mode) == 0o644


def test_a_sharded_index_keeps_its_mode(run: Any, tmp_path: Path, umask_022: None) -> None:
    src = _sharded(tmp_path)
    (src / "model.safetensors.index.json").chmod(0o600)
    res = run("convert", src, tmp_path / "out", "--img-size", "48")
    assert res.exit_code == 0, res.stderr
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors.index.json").stat().st_mode) == 0o600


# ---- 4. JSON budgets and field types ---------------------------------------------------------------------------


def _sharded(tmp_path: Path, index: Any = None) -> Path:
    """The HF ViT folder as one shard with its index (``index`` replaces the index's content)."""
    src = _model(tmp_path)
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(str(src / "model-00001-of-00001.safetensors"), "np") as f:
        keys = list(f.keys())
    if index is None:
        index = {"metadata": {"total_size": 1}, "weight_map": dict.fromkeys(keys, "model-00001-of-00001.safetensors")}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return src


def test_deep_config_is_refused_before_parsing(run: Any, tmp_path: Path) -> None:
    src = _model(tmp_path)
    (src / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    _one_error(run("inspect", src), 1, "config.json", f"deeper than {MAX_JSON_DEPTH}")
    (src / "config.json").write_text('{"model_type": "vit", "x": ' + "[" * 100_000)  # unbalanced, too
    _one_error(run("inspect", src), 1, "config.json")


def test_huge_config_is_refused_unread(run: Any, tmp_path: Path) -> None:
    src = _model(tmp_path)
    with open(src / "config.json", "wb") as f:
        f.write(b'{"model_type": "vit", "pad": "')
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: costs no disk
    _one_error(run("inspect", src), 1, "config.json", "16 MiB")


def test_deep_and_huge_index_are_refused(run: Any, tmp_path: Path) -> None:
    src = _sharded(tmp_path)
    index = src / "model.safetensors.index.json"
    index.write_text('{"weight_map": {}, "metadata": ' + "{" * 200 + "}" * 200 + "}")
    _one_error(run("inspect", src), 1, index.name, "deeper")
    with open(index, "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)
    _one_error(run("inspect", src), 1, index.name, "16 MiB")


def test_json_depth_budget_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    for depth in (MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1):
        path.write_text('{"a": "[[[[{{", "b": ' + "[" * (depth - 1) + '"]]"' + "]" * (depth - 1) + "}")
        if depth <= MAX_JSON_DEPTH:
            assert read_json(path, "test file")["a"] == "[[[[{{"
        else:
            with pytest.raises(CheckpointFormatError, match="deeper"):
                read_json(path, "test file")


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"architecture": "vit_tiny_patch8_32", "pretrained_cfg": {}, "model_args": "x"}, "model_args"),
        ({"architecture": "vit_tiny_patch8_32", "pretrained_cfg": []}, "pretrained_cfg"),
        ({"architecture": "vit_tiny_patch8_32", "pretrained_cfg": "x"}, "pretrained_cfg"),
        ({"architecture": "vit_tiny_patch8_32", "pretrained_cfg": {"input_size": "x"}}, "input_size"),
        ({"architecture": "vit_tiny_patch8_32", "pretrained_cfg": {"input_size": []}}, "input_size"),
        ({"model_type": "vit", "vision_config": "x"}, "vision_config"),
        ({"model_type": "vit", "vision_config": [32]}, "vision_config"),
    ],
)
def test_config_fields_of_the_wrong_type_are_one_line(run: Any, tmp_path: Path, config: Any, field: str) -> None:
    src = _model(tmp_path)
    (src / "config.json").write_text(json.dumps(config))
    _one_error(run("convert", src, tmp_path / "out", "--img-size", "48"), 1, "config.json", field)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_null_config_objects_read_as_absent(run: Any, tmp_path: Path) -> None:
    src = _model(tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "vision_config": None}))
    res = run("convert", src, tmp_path / "out", "--img-size", "48")
    assert res.exit_code == 0, res.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_size"] == 48
    timm = {"architecture": "vit_tiny_patch8_32", "pretrained_cfg": {"input_size": [3, 32, 32]}, "model_args": None}
    (src / "config.json").write_text(json.dumps(timm))
    res = run("convert", src, tmp_path / "out2", "--img-size", "48")
    assert res.exit_code == 0, res.stderr
    out = json.loads((tmp_path / "out2" / "config.json").read_text())
    assert out["pretrained_cfg"]["input_size"] == [3, 48, 48] and out["model_args"]["img_size"] == 48


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda i: {**i, "metadata": ["total_size", 1]}, "metadata"),
        (lambda i: {**i, "metadata": "x"}, "metadata"),
        (lambda i: {**i, "metadata": 7}, "metadata"),
        (lambda i: {**i, "weight_map": {k: 1 for k in i["weight_map"]}}, "weight_map"),
        (lambda i: {**i, "weight_map": [[k, v] for k, v in i["weight_map"].items()]}, "weight_map"),
        (lambda i: [i], "weight_map"),
    ],
)
def test_index_of_the_wrong_shape_is_one_line(run: Any, tmp_path: Path, damage: Any, needle: str) -> None:
    src = _sharded(tmp_path)
    index = src / "model.safetensors.index.json"
    index.write_text(json.dumps(damage(json.loads(index.read_text()))))
    _one_error(run("convert", src, tmp_path / "out", "--img-size", "48"), 1, index.name, needle)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
