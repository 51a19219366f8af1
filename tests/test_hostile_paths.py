"""Trust at the edges: paths that overlap, links, special files and hostile folders, modes, JSON budgets."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
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


_SWAP_AFTER_SNIFF = """
import os, sys
from pathlib import Path
from vitresize.errors import CheckpointFormatError
from vitresize.formats import sniff
from vitresize.formats.safetensors import SafetensorsCheckpoint
path = Path(sys.argv[1])
assert sniff(path) == "safetensors"
path.unlink()
os.mkfifo(path)
try:
    SafetensorsCheckpoint(path)
except CheckpointFormatError as e:
    print(e)
"""


def test_safetensors_swapped_for_a_fifo_after_the_sniff_is_refused_without_blocking(tmp_path: Path) -> None:
    """``read_header`` opens its file as ``open_regular`` does, not by a plain ``open`` that waits for a writer."""
    path = Path(shutil.copy(HF_VIT / "model.safetensors", tmp_path / "model.safetensors"))
    res = subprocess.run(
        [sys.executable, "-c", _SWAP_AFTER_SNIFF, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{path} is a named pipe (FIFO), not a regular file; pass a checkpoint file instead"


def test_missing_safetensors_is_one_line(tmp_path: Path) -> None:
    from vitresize.formats.safetensors import read_header

    with pytest.raises(CheckpointFormatError, match="does not exist"):
        read_header(tmp_path / "gone.safetensors")


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


def _hub_snapshot(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A hub cache repository (``tmp_path/hub/models--org--vit``) whose snapshot links HF ViT's files to its
    blobs as huggingface_hub does (``../../blobs/SHA``): ``(repo, blobs, snapshot)``."""
    files = _hub_blobs(tmp_path)
    repo = tmp_path / "hub" / "models--org--vit"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for name, blob in files.items():
        (snap / name).symlink_to(f"../../blobs/{blob.name}")
    return repo, repo / "blobs", snap


def test_hub_cache_snapshot_links_to_its_blobs_are_followed(run: Any, tmp_path: Path) -> None:
    repo, _, snap = _hub_snapshot(tmp_path)
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


@pytest.mark.parametrize("where", ["blobs", "repo", "inside blobs"])
def test_dst_holding_the_blobs_a_snapshot_links_to_is_refused(run: Any, tmp_path: Path, where: str) -> None:
    """``convert snapshots/rev blobs --force`` replaced blobs/ with the output: every revision lost its files."""
    repo, blobs, snap = _hub_snapshot(tmp_path)
    before = _state(tmp_path)
    dst = {"blobs": blobs, "repo": repo, "inside blobs": blobs / "out"}[where]
    _one_error(run("convert", snap, dst, "--img-size", "48", "--force"), 2, str(dst))
    assert _state(tmp_path) == before


@pytest.mark.parametrize("dst", [".", ".."])
def test_dst_dot_is_one_line_and_leaves_nothing(
    run: Any, tmp_path: Path, dst: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cd model && vitresize convert . . --force`` made its temp folder in the input and failed with EBUSY."""
    src = _model(tmp_path)
    (src / "sub").mkdir()
    monkeypatch.chdir(src / "sub")
    before = _state(tmp_path)
    _one_error(run("convert", src, dst, "--img-size", "48", "--force"), 2, "by name")
    assert _state(tmp_path) == before and not _leftovers(tmp_path)


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


@pytest.mark.parametrize(
    "content",
    [
        b'"\\' * 100_000,  # printf '"\\%.0s' {1..100000}: was quadratic in a string-stripping regex (minutes)
        b'"\\' * (MAX_JSON_BYTES // 2),  # the same at the size limit
        b'{"model_type": "vit", "x": "' + b"a" * (MAX_JSON_BYTES - 28),  # one unterminated string, at the limit
    ],
    ids=["backslash-quotes-200k", "backslash-quotes-16MiB", "unterminated-16MiB"],
)
def test_unterminated_strings_in_a_config_are_refused_quickly(tmp_path: Path, content: bytes) -> None:
    """In a subprocess with a timeout: a regression that scans the text in quadratic time fails, not hangs."""
    src = tmp_path / "model"
    src.mkdir()
    shutil.copy(HF_VIT / "model.safetensors", src / "model.safetensors")
    (src / "config.json").write_bytes(content)
    assert (src / "config.json").stat().st_size <= MAX_JSON_BYTES
    _one_error_sub(_cli("inspect", src / "model.safetensors", timeout=30), 1, "config.json", "not valid JSON")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 400 + ".0"])
def test_non_finite_numbers_in_json_are_refused(run: Any, tmp_path: Path, literal: str) -> None:
    """``json`` reads them as NaN or infinities, which ``json.dumps`` would write back as invalid JSON."""
    src = _model(tmp_path)
    config = (src / "config.json").read_text()
    (src / "config.json").write_text(config.rstrip().removesuffix("}") + f', "x": [{literal}]}}')
    with pytest.raises(CheckpointFormatError, match="not finite") as err:
        read_json(src / "config.json", "config")
    assert str(src / "config.json") in str(err.value) and "\n" not in str(err.value)
    _one_error(run("convert", src, tmp_path / "out", "--img-size", "48"), 1, "config.json", "not finite")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    index = _sharded(tmp_path / "sharded") / "model.safetensors.index.json"
    index.write_text(index.read_text().removesuffix("}") + f', "x": {literal}}}')
    _one_error(run("inspect", index.parent), 1, index.name, "not finite")


def test_finite_numbers_in_json_read_as_before(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"a": [1e308, -1e308, 5e-324, 1e-999, 0.5, -0, 12345678901234567890]}')
    assert read_json(path, "test file") == {"a": [1e308, -1e308, 5e-324, 0.0, 0.5, 0, 12345678901234567890]}


def test_huge_config_is_refused_unread(run: Any, tmp_path: Path) -> None:
    src = _model(tmp_path)
    with open(src / "config.json", "wb") as f:
        f.write(b'{"model_type": "vit", "pad": "')
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: costs no disk
    _one_error(run("inspect", src), 1, "config.json", "16 MiB")


def test_deep_and_huge_index_are_refused(run: Any, tmp_path: Path) -> None:
    src = _sharded(tmp_path)
    index = src / "model.safetensors.index.json"
    index.write_text('{"weight_map": {}, "metadata": ' + '{"a": ' * 199 + "{}" + "}" * 199 + "}")
    _one_error(run("inspect", src), 1, index.name, "deeper")
    index.write_text('{"weight_map": {}, "metadata": ' + "{" * 200 + "}" * 200 + "}")  # not JSON: parsed first
    _one_error(run("inspect", src), 1, index.name, "not a valid index")
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


# ---- 5. deep folders, read-only outputs, aliased paths, link DSTs, the umask, hub cache blobs ----------------


def _nest(root: Path, depth: int, name: str = "d") -> Path:
    """``root/d/d/.../d`` (``depth`` folders); returns the deepest."""
    p = root
    for _ in range(depth):
        p = p / name
        p.mkdir()
    return p


def _unnest(root: Path, deepest: Path) -> None:
    """Remove a chain :func:`_nest` made, deepest first (``shutil.rmtree`` recurses before Python 3.13)."""
    while deepest != root:
        for f in deepest.iterdir():
            f.unlink()
        deepest.rmdir()
        deepest = deepest.parent


def test_a_folder_nested_thousands_deep_is_one_line(run: Any, tmp_path: Path) -> None:
    src = _model(tmp_path)
    deepest = _nest(src, 1100, "a")  # a recursive walk: RecursionError
    try:
        _one_error(run("inspect", src), 1, f"{src / 'a'} holds folders nested more than 64 levels deep")
        _one_error(run("convert", src, tmp_path / "out", "--img-size", "48"), 1, "nested more than")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    finally:
        _unnest(src, deepest)


def test_folder_depth_limit_is_exact(run: Any, tmp_path: Path) -> None:
    from vitresize.formats.folder import MAX_FOLDER_DEPTH

    src = _model(tmp_path)
    deepest = _nest(src, MAX_FOLDER_DEPTH)
    (deepest / "notes.txt").write_text("deep")
    out = tmp_path / "out"
    res = run("convert", src, out, "--img-size", "48")
    assert res.exit_code == 0, res.stderr
    assert (out / deepest.relative_to(src) / "notes.txt").read_text() == "deep"
    (deepest / "d").mkdir()
    _one_error(run("inspect", src), 1, "nested more than", str(src / "d"))


def test_the_scan_gives_the_folders_size(tmp_path: Path) -> None:
    from vitresize.formats import open_checkpoint
    from vitresize.formats.folder import ShardedCheckpoint, scan_folder

    src = _model(tmp_path)
    (src / "sub").mkdir()
    (src / "sub" / "notes.txt").write_text("12345")
    (src / "LICENSE").symlink_to("sub/notes.txt")  # counted as its file, as a copy of it will be
    ckpt = open_checkpoint(src)
    try:
        assert isinstance(ckpt, ShardedCheckpoint)
        want = sum(f.stat().st_size for f in HF_VIT.iterdir()) + 10
        assert ckpt.size_bytes == want == ckpt.scan.size_bytes
        assert ckpt.scan.sizes["LICENSE"] == 5 and ckpt.folders == ["sub"]
    finally:
        ckpt.close()
    files, folders = scan_folder(src)  # the tuple API is kept
    assert set(files) == {"LICENSE", "config.json", "model.safetensors", "sub/notes.txt"} and folders == ["sub"]


def test_fsync_walks_the_output_without_rglob(run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitresize.formats.atomic import atomic_folder

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))

    def no_rglob(self: Path, pattern: str) -> Any:
        raise AssertionError("rglob recurses; walk with an explicit stack")

    monkeypatch.setattr(Path, "rglob", no_rglob)
    out = tmp_path / "out"
    modes = {"d": 0o550, "d/d": 0o500, "d/d/d": 0o700}
    with atomic_folder(out, force=False, fsync=True, mode=0o750, folder_modes=modes) as tmp:
        _nest(tmp, 3)
        (tmp / "d" / "d" / "d" / "notes.txt").write_text("deep")
        (tmp / "top.txt").write_text("top")
    assert len(synced) == 2 + 4 + 1  # 2 files, 4 folders, DST's parent
    mask = _current_umask()
    got = {name: stat.S_IMODE((out / name).stat().st_mode) for name in modes}
    assert got == {name: mode & ~mask for name, mode in modes.items()}
    assert stat.S_IMODE(out.stat().st_mode) == 0o750 & ~mask
    monkeypatch.undo()
    # The CLI, end to end: the source's folder modes, read-only ones included.
    src = _model(tmp_path)
    (_nest(src, 3) / "notes.txt").write_text("deep")
    for name, mode in reversed(modes.items()):
        (src / name).chmod(mode)
    res = run("convert", src, tmp_path / "out2", "--img-size", "48", "--fsync")
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "out2" / "d" / "d" / "d" / "notes.txt").read_text() == "deep"
    got = {name: stat.S_IMODE((tmp_path / "out2" / name).stat().st_mode) for name in modes}
    assert got == {name: mode & ~mask for name, mode in modes.items()}


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read-only folders in the output, as a user that is not root (root ignores permission bits).

NOBODY = 65534


@dataclass(frozen=True)
class _User:
    """How to run a child process that permission bits bind."""

    what: str
    prefix: tuple[str, ...] = ()
    kw: tuple[tuple[str, Any], ...] = ()
    owner: int | None = None
    """The owner to give the folder the child works in."""
    foreign: int | None = None
    """A user whose folders the child can neither write in nor change (None: none can be planted)."""


@functools.cache
def _find_unprivileged() -> _User | str:
    """The first way that works here: ourselves where we are not root; as root, root without the capabilities
    that override permission bits (``setpriv``: the interpreter may live in root's 0700 home), else user 65534.
    A string: why none works."""
    import tempfile

    if os.geteuid() != 0:
        options = [_User("this user")]
    else:
        drop = "--bounding-set=-dac_override,-dac_read_search,-fowner"
        options = [
            _User("root without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER", ("setpriv", drop), foreign=NOBODY),
            _User(
                f"uid {NOBODY}", kw=(("user", NOBODY), ("group", NOBODY), ("extra_groups", [])), owner=NOBODY, foreign=0
            ),
        ]
    probe = "import os, sys, vitresize\ntry:\n    open(os.path.join(sys.argv[1], 'x'), 'w')\nexcept PermissionError:\n"
    probe += "    sys.exit(0)\nsys.exit(3)"
    why = []
    for user in options:
        d = Path(tempfile.mkdtemp(prefix="vitresize-probe-"))
        try:
            d.chmod(0o555)
            res = subprocess.run(
                [*user.prefix, sys.executable, "-c", probe, str(d)],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
                **dict(user.kw),
            )
            if res.returncode == 0:
                return user
            why.append(f"{user.what}: {(res.stderr.strip().splitlines() or [f'exit {res.returncode}'])[-1]}")
        except (OSError, subprocess.SubprocessError) as e:
            why.append(f"{user.what}: {e}")
        finally:
            d.chmod(0o700)
            shutil.rmtree(d)
    return "no child process here is bound by permission bits (" + "; ".join(why) + ")"


@pytest.fixture
def unprivileged() -> _User:
    user = _find_unprivileged()
    if isinstance(user, str):
        pytest.skip(user)
    return user


@pytest.fixture
def shared_dir(unprivileged: _User) -> Iterator[Path]:
    """A fresh folder under the system temp folder, the unprivileged child's (pytest's may be root's, 0700)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="vitresize-test-"))
    if unprivileged.owner is not None:
        os.chown(d, unprivileged.owner, unprivileged.owner)
    yield d
    for dirpath, dirnames, _ in os.walk(d):  # top-down: each folder opened once it is made ours
        for name in dirnames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                p.chmod(0o700)
    shutil.rmtree(d)


_FAILING_FSYNC = """
import errno, runpy, sys
from pathlib import Path
import vitresize.formats.atomic as atomic
real = atomic._fsync
failure = sys.argv[1]
def failing(path):
    if Path(path).is_file():
        if failure == "interrupt":
            raise KeyboardInterrupt
        raise OSError(errno.EIO, "Input/output error", str(path))
    real(path)
atomic._fsync = failing
sys.argv = ["vitresize", *sys.argv[2:]]
runpy.run_module("vitresize", run_name="__main__")
"""


def _as_user(user: _User, home: Path, *args: Any, script: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
    head = ["-c", script] if script else ["-m", "vitresize"]
    return subprocess.run(
        [*user.prefix, sys.executable, *head, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        **dict(user.kw),
    )


def _read_only_source(parent: Path) -> Path:
    src = _model(parent, "ro")
    (src / "sub").mkdir()
    (src / "sub" / "notes.txt").write_text("notes")
    (src / "sub").chmod(0o555)
    return src


def test_replacing_an_output_with_read_only_folders_leaves_nothing(unprivileged: _User, shared_dir: Path) -> None:
    src = _read_only_source(shared_dir)
    out = shared_dir / "out"
    for flags in ([], ["--force"]):
        res = _as_user(unprivileged, shared_dir, "convert", src, out, "--img-size", "48", *flags)
        assert res.returncode == 0, res.stderr
        assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o555
        assert _leftovers(shared_dir) == [], _leftovers(shared_dir)


@pytest.mark.parametrize("failure", ["error", "interrupt"])
def test_a_failure_while_flushing_removes_read_only_temp_folders(
    unprivileged: _User, shared_dir: Path, failure: str
) -> None:
    src = _read_only_source(shared_dir)
    out = shared_dir / "out"
    res = _as_user(
        unprivileged, shared_dir, failure, "convert", src, out, "--img-size", "48", "--fsync", script=_FAILING_FSYNC
    )
    assert res.returncode == (1 if failure == "error" else 130), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists() and _leftovers(shared_dir) == [], _leftovers(shared_dir)


_REMOVE = """
import json, os, sys
from pathlib import Path
from vitresize.formats.atomic import _remove
root = Path(sys.argv[1])
outside = root / "outside"
outside.mkdir()
(outside / "keep").write_text("keep")
t = root / "t"
for folder, mode in (("a", 0o555), ("b/c", 0o555), ("b", 0o000), ("d", 0o300), ("e", 0o100), ("f", 0o400)):
    (t / folder).mkdir(parents=True, exist_ok=True)
    (t / folder / "file").write_text("x")
for folder, mode in (("a", 0o555), ("b/c", 0o555), ("b", 0o000), ("d", 0o300), ("e", 0o100), ("f", 0o400)):
    (t / folder).chmod(mode)
(t / "link").symlink_to(outside)
(t / "flink").symlink_to(outside / "keep")
outside.chmod(0o555)
t.chmod(0o500)
out = {}
_remove(t)
out["t_left"] = os.path.lexists(t)
out["outside"] = [oct(outside.stat().st_mode & 0o777), (outside / "keep").read_text()]
try:
    _remove(root / "u")
    out["u"] = "removed"
except OSError as e:
    out["u"] = e.errno
print(json.dumps(out))
"""


def test_remove_empties_read_only_folders_and_reports_what_it_cannot(unprivileged: _User, shared_dir: Path) -> None:
    if unprivileged.foreign is None:
        pytest.skip("needs root, to plant a folder the unprivileged child can neither empty nor change")
    u = shared_dir / "u"
    u.mkdir()
    (u / "foreign").mkdir()
    (u / "foreign" / "file").write_text("x")
    (u / "foreign").chmod(0o555)
    os.chown(u / "foreign", unprivileged.foreign, unprivileged.foreign)  # not the child's: no chmod, no unlink
    if unprivileged.owner is not None:
        os.chown(u, unprivileged.owner, unprivileged.owner)
    res = _as_user(unprivileged, shared_dir, shared_dir, script=_REMOVE)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["t_left"] is False
    assert got["outside"] == ["0o555", "keep"]  # links inside were not followed
    assert got["u"] in (1, 13) and (u / "foreign" / "file").exists()  # EPERM/EACCES, raised, not swallowed


# DST aliasing SRC through a bind mount, a case-insensitive name or a link: refused by identity.


@contextlib.contextmanager
def _bind(source: Path, at: Path) -> Iterator[Path]:
    at.mkdir()
    try:
        res = subprocess.run(["mount", "--bind", str(source), str(at)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"mount --bind cannot run here: {e}")
    if res.returncode:
        pytest.skip(f"mount --bind fails here (needs root and CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield at
    finally:
        if subprocess.run(["umount", str(at)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(at)], check=True)


def _alias(kind: str, source: Path, at: Path) -> contextlib.AbstractContextManager[Path]:
    if kind == "bind mount":
        return _bind(source, at)
    at.symlink_to(source)
    return contextlib.nullcontext(at)


@pytest.mark.parametrize("kind", ["bind mount", "symlink"])
def test_dst_inside_an_alias_of_src_is_refused(run: Any, tmp_path: Path, kind: str) -> None:
    src = _model(tmp_path, "m")
    before = _state(src)
    with _alias(kind, src, tmp_path / "bm") as bm:
        for dst in (bm / "sub", bm / "a" / "b"):
            _one_error(run("convert", src, dst, "--img-size", "48"), 2, "inside the input folder")
        assert _state(src) == before


@pytest.mark.parametrize("kind", ["bind mount", "symlink"])
def test_dst_holding_src_through_an_alias_is_refused(run: Any, tmp_path: Path, kind: str) -> None:
    src = _model(tmp_path / "r" / "p")
    before = _state(src)
    with _alias(kind, tmp_path / "r", tmp_path / "b") as b:
        for dst in (b / "p", b):
            _one_error(run("convert", src, dst, "--img-size", "48", "--force"), 2, "above SRC")
            _one_error(run("convert", src / "model.safetensors", dst, "--img-size", "48", "--force"), 2, "above SRC")
        assert _state(src) == before


def test_identity_refuses_what_paths_cannot_see(run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a case-insensitive file system (``Model`` and ``model`` one folder), where no path check can tell."""
    from vitresize.formats import atomic

    monkeypatch.setattr(atomic, "_resolved", lambda p: Path(os.path.normpath(p.absolute())))  # blind to links
    src = _model(tmp_path / "r" / "p")
    (tmp_path / "alias").symlink_to(src)
    (tmp_path / "up").symlink_to(tmp_path / "r")
    _one_error(run("convert", src, tmp_path / "alias" / "sub", "--img-size", "48"), 2, "inside the input folder")
    _one_error(run("convert", src, tmp_path / "up" / "p", "--img-size", "48", "--force"), 2, "above SRC")
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]


# A link as DST is replaced as a link, whatever it leads to; never written through.


def test_a_file_dst_that_links_to_a_folder_is_replaced_as_a_link(run: Any, tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    dst = tmp_path / "out.safetensors"
    dst.symlink_to(target)
    src = fixture("timm_vit_cls.safetensors")
    _one_error(run("convert", src, dst, "--img-size", "48"), 1, "already exists", "link")
    res = run("convert", src, dst, "--img-size", "48", "--force")
    assert res.exit_code == 0, res.stderr
    assert not dst.is_symlink() and dst.is_file()
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"] and _leftovers(tmp_path) == []


def test_a_folder_dst_that_links_to_a_file_is_replaced_as_a_link(run: Any, tmp_path: Path) -> None:
    src = _model(tmp_path)
    target = tmp_path / "notes.txt"
    target.write_text("keep")
    dst = tmp_path / "outdir"
    dst.symlink_to(target)
    _one_error(run("convert", src, dst, "--img-size", "48"), 1, "already exists", "link")
    res = run("convert", src, dst, "--img-size", "48", "--force")
    assert res.exit_code == 0, res.stderr
    assert not dst.is_symlink() and (dst / "model.safetensors").is_file()
    assert target.read_text() == "keep" and _leftovers(tmp_path) == []


# The umask is read, never set (a host application's threads may create files meanwhile).


def test_the_umask_is_read_without_setting_it(
    run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_022: None
) -> None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    if "Umask:" not in status:
        pytest.skip("no Umask: line in /proc/self/status (not Linux 4.7+): the umask is set and restored once")
    calls: list[int] = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
    src = _model(tmp_path)
    (src / "model.safetensors").chmod(0o666)
    (src / "config.json").chmod(0o664)
    res = run("convert", src, tmp_path / "out", "--img-size", "48")
    assert res.exit_code == 0, res.stderr
    assert calls == []
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out" / "config.json").stat().st_mode) == 0o644


def test_without_proc_the_umask_is_set_and_restored_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_022: None
) -> None:
    from vitresize.formats import atomic

    monkeypatch.setattr(atomic, "_PROC_STATUS", str(tmp_path / "missing"))
    calls: list[int] = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
    atomic._umask_once.cache_clear()
    try:
        assert [atomic.permissions(0o666, 0o600) for _ in range(3)] == [0o644] * 3
        assert atomic.permissions(None, 0o777) == 0o755
        assert calls == [0, 0o022]
    finally:
        atomic._umask_once.cache_clear()


# Links to hub cache blobs from any folder (older huggingface_hub local_dir downloads, links made by hand).


def _hub_blobs(root: Path, repo: str = "models--org--vit") -> dict[str, Path]:
    """HF ViT's files as a hub cache repository's blobs (``root/hub/REPO/blobs/SHA``), by file name."""
    blobs = root / "hub" / repo / "blobs"
    blobs.mkdir(parents=True)
    out = {}
    for f in HF_VIT.iterdir():
        out[f.name] = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, out[f.name])
    return out


def test_local_dir_links_to_hub_cache_blobs_are_followed(run: Any, tmp_path: Path, umask_022: None) -> None:
    blobs = _hub_blobs(tmp_path / "cache")
    blobs["model.safetensors"].chmod(0o600)
    blobs["config.json"].chmod(0o640)
    local = tmp_path / "local" / "vit"
    local.mkdir(parents=True)
    (local / "model.safetensors").symlink_to(blobs["model.safetensors"])  # absolute, as huggingface_hub wrote
    (local / "config.json").symlink_to(os.path.relpath(blobs["config.json"], local))  # relative, by hand
    before = _state(tmp_path / "cache")
    res = run("convert", local, tmp_path / "out", "--img-size", "48")
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "out"
    assert all(not p.is_symlink() and p.is_file() for p in out.iterdir())
    assert json.loads((out / "config.json").read_text())["image_size"] == 48
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"model.safetensors": 0o600, "config.json": 0o640}  # never wider than the blob's
    assert _state(tmp_path / "cache") == before
    assert run("inspect", local).exit_code == 0


@pytest.mark.parametrize(
    "target",
    ["blobs of a dataset repo", "blobs outside a repo", "a subfolder of blobs", "the blobs folder", "a blob link"],
)
def test_other_links_out_of_a_folder_are_still_refused(run: Any, tmp_path: Path, target: str) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    if target == "blobs of a dataset repo":
        dest = _hub_blobs(tmp_path, "datasets--org--data")["config.json"]
    elif target == "blobs outside a repo":
        dest = _hub_blobs(tmp_path, "org--vit")["config.json"]
    elif target == "a subfolder of blobs":
        dest = _hub_blobs(tmp_path)["config.json"].parent / "sub" / "notes"
        dest.parent.mkdir()
        dest.write_text("notes")
    elif target == "the blobs folder":
        dest = _hub_blobs(tmp_path)["config.json"].parent
    else:  # a "blob" that is itself a link out: the target, fully resolved, is what counts
        dest = _hub_blobs(tmp_path)["config.json"].parent / ("0" * 64)
        dest.symlink_to(secret)
    src = _model(tmp_path)
    (src / "README.md").symlink_to(dest)
    _one_error(run("convert", src, tmp_path / "out", "--img-size", "48"), 1, "README.md", "outside")
    assert not (tmp_path / "out").exists()


def test_an_old_output_that_cannot_be_removed_is_reported(unprivileged: _User, shared_dir: Path) -> None:
    if unprivileged.foreign is None:
        pytest.skip("needs root, to plant a folder the unprivileged child can neither empty nor change")
    src = _model(shared_dir, "src")
    out = shared_dir / "out"
    (out / "foreign").mkdir(parents=True)
    (out / "foreign" / "file").write_text("x")
    (out / "foreign").chmod(0o555)
    os.chown(out / "foreign", unprivileged.foreign, unprivileged.foreign)
    if unprivileged.owner is not None:
        os.chown(out, unprivileged.owner, unprivileged.owner)
    res = _as_user(unprivileged, shared_dir, "convert", src, out, "--img-size", "48", "--force")
    assert res.returncode == 1, res.stderr
    (line,) = res.stderr.strip().splitlines()
    (old,) = _leftovers(shared_dir)
    assert line.startswith(f"Error: wrote {out}") and str(old) in line and "remove it by hand" in line, line
    assert json.loads((out / "config.json").read_text())["image_size"] == 48
    assert (old / "foreign" / "file").exists()
