"""torchvision ViT end to end: equals interpolate_embeddings bit for bit, loads strictly."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import digest, fixture, load_any, spec
from make_fixtures import build_model
from timm.layers import resample_patch_embed
from torchvision.models.vision_transformer import interpolate_embeddings

NAME = "torchvision_vit.pth"


@pytest.mark.parametrize("method", ["native", "torchvision"])
@pytest.mark.parametrize("img", [48, 16, 64, 32])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_equals_interpolate_embeddings(run: Any, tmp_path: Path, method: str, img: int, suffix: str) -> None:
    dst = tmp_path / f"out{suffix}"
    res = run("convert", fixture(NAME), dst, "--img-size", img, "--method", method, "--json")
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["family"] == "torchvision" and rep["method"] == "torchvision"
    src = load_any(fixture(NAME))
    want = interpolate_embeddings(img, 8, OrderedDict((k, v.clone()) for k, v in src.items()))
    out = load_any(dst)
    assert out.keys() == src.keys()
    for k, v in out.items():
        if k == "encoder.pos_embedding":
            assert torch.equal(v, want[k])
        else:
            assert digest(v) == digest(src[k]), k
    build_model(spec(NAME), image_size=img).load_state_dict(out, strict=True)


def test_non_square_target(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "out.pth"
    assert run("convert", fixture(NAME), dst, "--img-size", "32x48").exit_code == 0
    out = load_any(dst)
    assert out["encoder.pos_embedding"].shape == (1, 1 + 4 * 6, 16)
    # torchvision's model takes one image_size; a rectangular grid loads into its parameters by shape.
    assert out["class_token"].shape == (1, 1, 16)


def test_patch_change_is_pi_resized_and_loads(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "out.pth"
    res = run("convert", fixture(NAME), dst, "--img-size", "32", "--patch", "4")
    assert res.exit_code == 0, res.stderr
    src, out = load_any(fixture(NAME)), load_any(dst)
    assert torch.equal(out["conv_proj.weight"], resample_patch_embed(src["conv_proj.weight"], [4, 4]))
    want = interpolate_embeddings(32, 4, OrderedDict((k, v.clone()) for k, v in src.items()))
    assert torch.equal(out["encoder.pos_embedding"], want["encoder.pos_embedding"])
    build_model(spec(NAME), image_size=32, patch_size=4).load_state_dict(out, strict=True)


def test_family_override(run: Any, tmp_path: Path) -> None:
    res = run("convert", fixture(NAME), tmp_path / "o.pth", "--img-size", "48", "--family", "timm")
    assert res.exit_code == 1
    assert "family 'timm'" in res.stderr and "--family auto" in res.stderr
    assert not (tmp_path / "o.pth").exists()
