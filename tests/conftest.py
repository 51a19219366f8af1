"""Shared test set-up: a pinned environment, the committed fixtures, and a CLI runner."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(FIXTURES))

import make_fixtures  # noqa: E402

from vitresize.cli import app  # noqa: E402


@pytest.fixture(autouse=True)
def _pinned_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("VITRESIZE_DEBUG", raising=False)


@pytest.fixture
def run() -> Any:
    """``run("convert", src, dst, "--img-size", "48")`` -> click Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def _run(*args: Any) -> Any:
        return runner.invoke(app, [str(a) for a in args])

    return _run


def fixture(name: str) -> Path:
    return FIXTURES / name


def spec(name: str) -> make_fixtures.Spec:
    return make_fixtures.SPECS[name]


def load_any(path: Path) -> Any:
    """The whole object in a written file (safetensors -> flat dict)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def digest(t: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and raw bytes."""
    t = t.detach().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + raw).hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".vitresize-tmp")]


@pytest.fixture
def no_leftovers(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    assert leftovers(tmp_path) == []


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.int64: "I64", torch.bool: "BOOL"}


def sparse_safetensors(model: torch.nn.Module, path: Path) -> None:
    """A safetensors file of the model's shapes whose data is a hole (reads as zeros, takes no disk): a
    full-size model (built on the meta device) planned from its header alone."""
    header, offset = {}, 0
    for k, v in model.state_dict().items():
        n = v.numel() * v.element_size()
        header[k] = {
            "dtype": _SAFETENSORS_DTYPES[v.dtype],
            "shape": list(v.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + offset)


def assert_tensors_close(out: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The same keys, shapes and dtypes; floats within 1e-6 (relative and absolute), the rest equal."""
    assert set(out) == set(want)
    for k, v in want.items():
        assert out[k].shape == v.shape, k
        assert out[k].dtype == v.dtype, k
        if v.is_floating_point():
            torch.testing.assert_close(out[k], v, rtol=1e-6, atol=1e-6, msg=k)
        else:
            assert torch.equal(out[k], v), k
