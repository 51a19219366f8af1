"""Writing never leaves a partial file, never changes the input, and --verify proves pass-through tensors.

Signals are sent to a real ``vitresize`` process; ENOSPC and read-only folders come from real (tmpfs)
file systems when the test may mount them, and are skipped with the reason when it may not.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, digest, file_digest, fixture, leftovers, load_any

import vitresize

# Runs the CLI, but blocks inside the writer, after some bytes of the temp file are written, until killed.
_STALLED_WRITER = """
import sys, time
from pathlib import Path
import vitresize.formats._copy as copy_engine
import vitresize.formats.torch_pickle as tp

ready = Path(sys.argv.pop(1))

def stall(fd_or_path):
    if isinstance(fd_or_path, int):
        import os
        os.write(fd_or_path, b"partial")
    ready.touch()
    for _ in range(600):
        time.sleep(0.1)

real_write_all = copy_engine.write_all
def write_all(fd, data, *args, **kwargs):
    real_write_all(fd, data, *args, **kwargs)
    stall(fd)
copy_engine.write_all = write_all

real_save = tp.save_container
def save(obj, dst, *args, **kwargs):
    real_save(obj, dst, *args, **kwargs)
    stall(str(dst))
tp.save_container = save

from vitresize.cli import main
sys.argv[0] = "vitresize"
main()
"""


@pytest.mark.parametrize(
    ("sig", "code", "suffix"),
    [
        (signal.SIGINT, 130, ".safetensors"),
        (signal.SIGTERM, 143, ".safetensors"),
        (signal.SIGINT, 130, ".pth"),
        (signal.SIGTERM, 143, ".pth"),
    ],
)
def test_signal_mid_write_leaves_nothing(tmp_path: Path, sig: int, code: int, suffix: str) -> None:
    src = tmp_path / "in.pth"
    shutil.copy(fixture("deit_distilled.pth"), src)
    before = file_digest(src)
    dst = tmp_path / f"out{suffix}"
    dst.write_bytes(b"the old output")
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    args = ["convert", str(src), str(dst), "--img-size", "48", "--force"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _STALLED_WRITER, str(ready), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the writer never started"
            time.sleep(0.05)
        assert leftovers(tmp_path), "the temp file should exist mid-write"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [
        f"Error: interrupted by {signal.Signals(sig).name}; no partial output was left behind"
    ]
    assert leftovers(tmp_path) == []
    assert dst.read_bytes() == b"the old output"
    assert file_digest(src) == before


@pytest.mark.parametrize("src_name", ["deit_distilled.pth", "timm_vit_reg4.safetensors", "timm_vit_legacy.pth"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_verify_reports_every_pass_through_tensor(run: Any, tmp_path: Path, src_name: str, suffix: str) -> None:
    dst = tmp_path / f"o{suffix}"
    res = run("convert", fixture(src_name), dst, "--img-size", "48", "--patch", "4", "--verify", "--json")
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    v = rep["verified"]
    assert v["identical"] is True and v["tensors"] >= rep["passed_through"] > 0
    src, out = load_any(fixture(src_name)), load_any(dst)
    if suffix == ".safetensors" and "model" in src:
        src = src["model"]
    changed = {c["key"] for c in rep["changes"] if c["state_dict"] in ("", "model")}
    flat = {k: t for k, t in src.items() if isinstance(t, torch.Tensor) and k not in changed}
    out_flat = {k: t for k, t in out.items() if isinstance(t, torch.Tensor)}
    assert all(digest(out_flat[k]) == digest(t) for k, t in flat.items())


def test_verify_off_by_default(run: Any, tmp_path: Path) -> None:
    res = run("convert", fixture("timm_vit_cls.pth"), tmp_path / "o.safetensors", "--img-size", "48", "--json")
    assert json.loads(res.stdout)["verified"] is None


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_verify_catches_a_changed_pass_through_byte(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, suffix: str
) -> None:
    """A writer bug that alters one pass-through tensor is caught, and nothing is written."""
    from vitresize.formats.base import Written
    from vitresize.formats.safetensors import SafetensorsWriter
    from vitresize.formats.torch_pickle import TorchWriter

    writer = SafetensorsWriter if suffix == ".safetensors" else TorchWriter
    real = writer.write

    def corrupting(self: Any, tmp: Path, *args: Any) -> Written:
        n = real(self, tmp, *args)
        if suffix == ".safetensors":
            from safetensors.torch import load_file, save_file

            out = load_file(str(tmp))
            out["norm.weight"] = out["norm.weight"] + 1
            save_file(out, str(tmp))
        else:
            out = torch.load(tmp, weights_only=True)
            out["norm.weight"] = out["norm.weight"] + 1
            torch.save(out, tmp)
        return n

    monkeypatch.setattr(writer, "write", corrupting)
    dst = tmp_path / f"o{suffix}"
    with pytest.raises(vitresize.InternalError, match=r"'norm\.weight' differs from the input.*a bug in vitresize"):
        vitresize.convert(fixture("timm_vit_cls.pth"), dst, img_size=48, verify=True)
    assert not dst.exists() and leftovers(tmp_path) == []


def _with_nan(tmp_path: Path, suffix: str) -> Path:
    sd = load_any(fixture("timm_vit_bf16.safetensors"))
    sd["pos_embed"][0, 3, 2] = float("nan")
    sd["pos_embed"][0, 5, 1] = float("-inf")
    path = tmp_path / f"nan{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_nan_and_inf_are_reported(run: Any, tmp_path: Path, suffix: str) -> None:
    src = _with_nan(tmp_path, suffix)
    res = run("inspect", src, "--json")
    assert res.exit_code == 0
    ins = json.loads(res.stdout)
    assert ins["models"][0]["nonfinite"] == {"pos_embed": 2, "patch_embed.proj.weight": 0}
    assert any("pos_embed holds 2 NaN/Inf" in w for w in ins["warnings"])
    res = run("convert", src, tmp_path / "o.safetensors", "--img-size", "48")
    assert res.exit_code == 0 and "Warning: pos_embed holds 2 NaN/Inf value(s) of 272" in res.stderr


def test_nonfinite_counting_from_bytes_matches_torch() -> None:
    from vitresize.formats._dtypes import TORCH_TO_ST, count_nonfinite
    from vitresize.formats.safetensors import tensor_bytes

    t = torch.randn(1000)
    t[::7] = float("nan")
    t[3::11] = float("inf")
    t[5::13] = -float("inf")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = t.to(dtype)
        want = int((~torch.isfinite(x)).sum())
        assert count_nonfinite(bytes(tensor_bytes(x)), TORCH_TO_ST[str(dtype).removeprefix("torch.")]) == want
    assert count_nonfinite(bytes(8), "I64") == 0


def test_numpy_scalars_in_training_checkpoints_load(run: Any, tmp_path: Path) -> None:
    import numpy as np

    src = tmp_path / "train.pth"
    ckpt = {"model": load_any(fixture("timm_vit_cls.pth")), "best_acc1": np.float64(81.5), "step": np.int64(9)}
    torch.save(ckpt, src)
    dst = tmp_path / "o.pth"
    res = run("convert", src, dst, "--img-size", "48", "--verify")
    assert res.exit_code == 0, res.stderr
    from vitresize.formats.torch_pickle import load_container

    out = load_container(dst, mmap=False)
    assert out["best_acc1"] == np.float64(81.5) and out["step"] == np.int64(9)


def test_numpy_1_scalar_module_name_loads(tmp_path: Path) -> None:
    """Pickles written by NumPy 1.x name ``numpy.core.multiarray.scalar``."""
    import numpy as np

    from vitresize.formats.torch_pickle import load_container

    path = tmp_path / "np1.pth"
    torch.save({"w": torch.ones(2), "acc": np.float64(0.5)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert load_container(path, mmap=False)["acc"] == 0.5


def test_numpy_arrays_stay_refused(run: Any, tmp_path: Path) -> None:
    import numpy as np

    src = tmp_path / "arr.pth"
    torch.save({"model": load_any(fixture("timm_vit_cls.pth")), "hist": np.zeros(3)}, src)
    res = run("inspect", src)
    assert res.exit_code == 1 and "numpy._core.multiarray._reconstruct" in res.stderr


# --- real file systems ------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(where: Path, *opts: str) -> Iterator[Path]:
    where.mkdir()
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_disk_full_for_real(run: Any, tmp_path: Path, suffix: str) -> None:
    """A 16 kB tmpfs fills up mid-write (the outputs are 26 kB and 130 kB): exit 1, no output, no temp file."""
    with _tmpfs(tmp_path / "small", "size=16k") as small:
        dst = small / f"o{suffix}"
        res = run("convert", fixture("deit_distilled.pth"), dst, "--img-size", "48")
        assert res.exit_code == 1
        assert res.stderr.startswith(f"Error: cannot write {dst}: No space left on device")
        assert len(res.stderr.strip().splitlines()) == 1
        assert list(small.iterdir()) == []


def test_read_only_folder_for_real(run: Any, tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        res = run("convert", fixture("timm_vit_cls.pth"), ro / "o.safetensors", "--img-size", "48")
        assert res.exit_code == 1 and "Read-only file system" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_unreadable_input(run: Any, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permission bits")
    src = tmp_path / "locked.pth"
    shutil.copy(fixture("timm_vit_cls.pth"), src)
    src.chmod(0)
    res = run("inspect", src)
    assert res.exit_code == 1 and "Permission denied" in res.stderr


def test_unreadable_input_at_the_os_level(monkeypatch: pytest.MonkeyPatch, run: Any) -> None:
    import builtins

    real_open = builtins.open

    def deny(file: Any, *a: Any, **k: Any) -> Any:
        if str(file).endswith("timm_vit_cls.pth"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    res = run("inspect", fixture("timm_vit_cls.pth"))
    assert res.exit_code == 1 and res.stderr.startswith("Error: cannot read") and "Permission denied" in res.stderr


@pytest.mark.parametrize(
    ("name", "wrong"),
    [("timm_vit_cls.pth", "x.safetensors"), ("timm_vit_reg4.safetensors", "x.pth"), ("timm_vit_legacy.pth", "x.npz")],
)
def test_content_beats_extension(run: Any, tmp_path: Path, name: str, wrong: str) -> None:
    src = tmp_path / wrong
    shutil.copy(fixture(name), src)
    res = run("convert", src, tmp_path / "o.safetensors", "--img-size", "48", "--verify")
    assert res.exit_code == 0, res.stderr


def _broken_inputs(tmp: Path) -> dict[str, Path]:
    cases = {"empty": b"", "folder": None}
    for name in ("timm_vit_cls.safetensors", "timm_vit_cls.pth", "timm_vit_legacy.pth"):
        data = fixture(name).read_bytes()
        for cut in (1, 8, 9, 64, len(data) // 2, len(data) - 1):
            cases[f"{name}[:{cut}]"] = data[:cut]
    out = {}
    for i, (label, data) in enumerate(cases.items()):
        path = tmp / f"in{i}.pth"
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)
        out[label] = path
    out["no ViT"] = fixture("resnet_no_vit.safetensors")
    return out


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_broken_inputs_get_one_error_line_naming_the_file(run: Any, tmp_path: Path, command: str) -> None:
    for label, src in _broken_inputs(tmp_path).items():
        if command == "inspect" and label == "no ViT":
            continue  # inspect describes any checkpoint; it warns there is no ViT
        before = file_digest(src) if src.is_file() else None
        dst = tmp_path / "out" / "o.safetensors"
        dst.parent.mkdir(exist_ok=True)
        args = [command, src] + ([dst, "--img-size", "48"] if command == "convert" else [])
        res = run(*args)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 1, (label, res.stderr)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and str(src) in lines[0], (label, lines)
        assert not dst.exists() and list(dst.parent.iterdir()) == []
        assert before is None or file_digest(src) == before


@pytest.mark.parametrize("fsync", [False, True])
def test_fsync_only_when_asked(monkeypatch: pytest.MonkeyPatch, run: Any, tmp_path: Path, fsync: bool) -> None:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    args = ["convert", fixture("timm_vit_cls.pth"), tmp_path / "o.safetensors", "--img-size", "48"]
    res = run(*args, *(["--fsync"] if fsync else []))
    assert res.exit_code == 0, res.stderr
    assert (len(calls) >= 2) if fsync else not calls  # the file, then its folder
