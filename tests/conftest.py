"""Shared test set-up: a pinned environment, the committed fixtures, and a CLI runner."""

from __future__ import annotations

import argparse
import hashlib
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
