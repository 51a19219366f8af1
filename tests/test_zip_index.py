"""The torch-free index of zip checkpoints agrees with torch.load, and stands aside for anything it does not model."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT, fixture
from safetensors.torch import load_file

import vitresize
from vitresize.formats._zip_index import TensorRef, read_zip_index
from vitresize.formats.safetensors import tensor_bytes
from vitresize.formats.torch_pickle import TorchCheckpoint, iter_state_dicts, load_container

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool, torch.int16]  # fmt: skip


def _rich_container() -> dict[str, Any]:
    """Every shape of data torch.save writes for a training checkpoint: views, shared storages, dtypes."""
    base = torch.arange(96, dtype=torch.float32)
    model: OrderedDict[str, Any] = OrderedDict()
    for i, dt in enumerate(DTYPES):
        model[f"t{i}"] = (torch.arange(6) % 2).to(dt).reshape(2, 3)
    model["view"] = base[10:40]  # storage offset
    model["same_storage"] = base[50:60]
    model["transposed"] = base.reshape(8, 12).t()  # not contiguous
    model["param"] = torch.nn.Parameter(torch.ones(4, 4))
    model["scalar"] = torch.tensor(3.5)
    model["empty"] = torch.empty(0, 5)
    return {
        "model": model,
        "model_ema": OrderedDict(w=torch.zeros(3)),
        "epoch": 7,
        "args": argparse.Namespace(lr=0.1, model="vit"),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
    }


def _torch_view(path: Path) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    return {
        "/".join(p): {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()}
        for p, sd in iter_state_dicts(load_container(path, mmap=True))
    }


@pytest.mark.parametrize("name", ["deit_distilled.pth", "timm_vit_cls.pth", "timm_vit_ddp.pth", "timm_vit_fp16.pth"])
def test_index_matches_torch_load_on_fixtures(name: str) -> None:
    ckpt = TorchCheckpoint(fixture(name), zip_format=True)
    assert ckpt._index is not None, "the index should model every committed zip fixture"
    got = {sd: {k: (i.shape, i.dtype) for k, i in infos.items()} for sd, infos in ckpt.state_dicts.items()}
    assert got == _torch_view(fixture(name))


def test_index_matches_torch_load_on_views_dtypes_and_containers(tmp_path: Path) -> None:
    src = tmp_path / "rich.pth"
    torch.save(_rich_container(), src)
    ckpt = TorchCheckpoint(src, zip_format=True)
    assert ckpt._index is not None
    got = {sd: {k: (i.shape, i.dtype) for k, i in infos.items()} for sd, infos in ckpt.state_dicts.items()}
    assert got == _torch_view(src)
    assert ckpt.extras == ["epoch", "args", "optimizer"]
    assert ckpt.top_keys() == ["model", "model_ema", "epoch", "args", "optimizer"]
    # Byte ranges are exact for every contiguous, non-empty tensor; the others are read through torch.
    data = src.read_bytes()
    ranges = ckpt.file_ranges("model")
    assert set(ranges) == set(ckpt.state_dicts["model"]) - {"transposed", "empty"}
    for key, (offset, n) in ranges.items():
        assert data[offset : offset + n] == bytes(tensor_bytes(ckpt.tensor("model", key))), key


def test_conversion_of_a_rich_container_keeps_every_tensor(tmp_path: Path) -> None:
    """Index-planned .safetensors output: copied ranges and torch-read tensors land as torch.load has them."""
    sd = torch.load(fixture("timm_vit_cls.pth"), weights_only=True)
    rich = _rich_container()
    rich["model"] = OrderedDict(list(sd.items()) + list(rich["model"].items()))
    src = tmp_path / "rich.pth"
    torch.save(rich, src)
    dst = tmp_path / "o.safetensors"
    vitresize.convert(src, dst, img_size=48)
    out = load_file(dst)
    for k, v in rich["model"].items():
        if k not in ("pos_embed", "patch_embed.proj.weight"):
            assert out[k].dtype == v.dtype and torch.equal(out[k], v), k


def test_index_stands_aside_for_unknown_globals(tmp_path: Path) -> None:
    """A global outside its allow-list (here NumPy's scalar) leaves the file to torch.load's allow-list."""
    src = tmp_path / "np.pth"
    torch.save({"model": torch.load(fixture("timm_vit_cls.pth"), weights_only=True), "acc": np.float64(81.2)}, src)
    assert read_zip_index(src) is None
    ckpt = TorchCheckpoint(src, zip_format=True)
    assert "model" in ckpt.state_dicts and ckpt.extras == ["acc"]


@pytest.mark.parametrize("name", ["malicious.pth"])
def test_index_never_builds_a_malicious_pickle(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert read_zip_index(fixture(name)) is None
    assert not (tmp_path / "vitresize-pwned").exists()


def test_index_stands_aside_for_big_endian_and_compressed_files(tmp_path: Path) -> None:
    src = fixture("timm_vit_cls.pth")
    squeezed = tmp_path / "deflated.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(squeezed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert read_zip_index(squeezed) is None
    big = tmp_path / "big.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(big, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, b"big" if info.filename.endswith("/byteorder") else data)
    assert read_zip_index(big) is None


def test_index_refs_describe_views() -> None:
    index = read_zip_index(fixture("timm_vit_cls.pth"))
    assert index is not None
    ref = index.container["pos_embed"]
    assert isinstance(ref, TensorRef) and ref.is_contiguous() and ref.dtype == "float32"


def test_inspect_and_plan_of_a_zip_pth_do_not_import_torch() -> None:
    """Planning reads the index only: the copy of a big .pth starts while torch is still importing."""
    code = (
        "import sys, vitresize\n"
        f"vitresize.inspect({str(fixture('deit_distilled.pth'))!r})\n"
        f"p = vitresize.plan({str(fixture('deit_distilled.pth'))!r}, img_size=48)\n"
        "assert p.changes\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    assert "TORCH False" in out.stdout, out.stdout + out.stderr
