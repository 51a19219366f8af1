"""Files that would need code execution are refused, and nothing in them runs."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import fixture, load_any


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused_and_not_run(run: Any, tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    sd = load_any(fixture("timm_vit_cls.pth"))
    torch.save({"model": sd, "hook": _Payload(marker)}, evil, _use_new_zipfile_serialization=zip_format)
    res = run("convert", evil, tmp_path / "o.safetensors", "--img-size", "48")
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: refused to load") and "posix.system" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()
    assert run("inspect", evil).exit_code == 1 and not marker.exists()


def test_plain_pickle_is_refused(run: Any, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    res = run("inspect", evil)
    assert res.exit_code == 1 and "Error:" in res.stderr and not marker.exists()


def test_torchscript_is_refused(run: Any, tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    with zipfile.ZipFile(path, "w") as z:  # the layout torch.jit.save writes
        z.writestr("scripted/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("scripted/constants.pkl", b"\x80\x02).")
        z.writestr("scripted/code/__torch__.py", "def forward(self): pass\n")
    res = run("convert", path, tmp_path / "o.safetensors", "--img-size", "48")
    assert res.exit_code == 1 and "TorchScript" in res.stderr and "state_dict" in res.stderr


def test_npz_object_arrays_are_refused_without_unpickling(run: Any, tmp_path: Path) -> None:
    """An .npz member holding a pickled object array is named and refused; nothing is unpickled."""
    import numpy as np

    path = tmp_path / "vit.npz"
    np.savez(path, **{"embedding/kernel": np.zeros((8, 8, 3, 16), np.float32), "evil": np.array([{}], dtype=object)})
    res = run("inspect", path)
    assert res.exit_code == 1 and "'evil'" in res.stderr and "pickle" in res.stderr


def test_safetensors_header_pointing_outside_is_refused(run: Any, tmp_path: Path) -> None:
    import json
    import struct

    header = json.dumps({"pos_embed": {"dtype": "F32", "shape": [1, 17, 16], "data_offsets": [0, 10**9]}}).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    res = run("inspect", bad)
    assert res.exit_code == 1 and "corrupt or truncated" in res.stderr
