"""timm and DeiT checkpoints end to end: the CLI output equals timm's own resampling and loads strictly."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import digest, fixture, load_any, spec
from make_fixtures import build_model
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import checkpoint_filter_fn

# (name, extra CLI args, new image size, new patch)
SQUARE_TARGETS = [
    ("larger", ["--img-size", "48"], (48, 48), 8),
    ("smaller", ["--img-size", "16"], (16, 16), 8),
    ("non-square", ["--img-size", "32x48"], (32, 48), 8),
    ("new-patch", ["--patch", "4"], (32, 32), 4),
    ("new-patch-and-size", ["--img-size", "64", "--patch", "16"], (64, 64), 16),
]
RECT_TARGETS = [  # the 32x48 source, patch 16, grid 2x3
    ("larger", ["--img-size", "64x96"], (64, 96), 16),
    ("smaller", ["--img-size", "16x32"], (16, 32), 16),
    ("non-square", ["--img-size", "48x32"], (48, 32), 16),
    ("new-patch", ["--patch", "8"], (32, 48), 8),
]
SQUARE_FIXTURES = [
    "timm_vit_cls.pth",
    "timm_vit_cls.safetensors",
    "deit_distilled.pth",
    "timm_vit_reg4.safetensors",
    "timm_vit_gap.safetensors",
    "timm_vit_no_embed_class.pth",
]
CASES = [(f, t) for f in SQUARE_FIXTURES for t in SQUARE_TARGETS] + [
    ("timm_vit_32x48.safetensors", t) for t in RECT_TARGETS
]


def _model_dicts(obj: Any) -> dict[str, dict[str, torch.Tensor]]:
    if "model" in obj:
        return {"model": obj["model"], "model_ema": obj["model_ema"]}
    return {"": obj}


def _oracle(sd: dict[str, torch.Tensor], model: Any, old_grid: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """timm's checkpoint_filter_fn, or for a non-square source its two calls with old_size explicit."""
    if old_grid is None:
        return checkpoint_filter_fn(dict(sd), model)
    out = {}
    for k, v in sd.items():
        if k == "patch_embed.proj.weight":
            v = resample_patch_embed(v, list(model.patch_embed.proj.weight.shape[-2:]))
        elif k == "pos_embed":
            prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            v = resample_abs_pos_embed(
                v, new_size=list(model.patch_embed.grid_size), old_size=list(old_grid), num_prefix_tokens=prefix
            )
        out[k] = v
    return out


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize(("name", "target"), CASES, ids=[f"{f}-{t[0]}" for f, t in CASES])
def test_matches_timm_and_loads_strictly(run: Any, tmp_path: Path, name: str, target: Any, suffix: str) -> None:
    _, args, new_img, new_patch = target
    s = spec(name)
    rect = name == "timm_vit_32x48.safetensors"
    extra = ["--from-img-size", "32x48"] if rect else []
    dst = tmp_path / f"out{suffix}"
    res = run("convert", fixture(name), dst, "--method", "timm", *args, *extra)
    assert res.exit_code == 0, res.stderr
    src_dicts = _model_dicts(load_any(fixture(name)))
    out_obj = load_any(dst)
    out_dicts = _model_dicts(out_obj) if suffix == ".pth" else {"model" if "model" in src_dicts else "": out_obj}
    model = build_model(s, img_size=new_img, patch_size=new_patch)
    for sd_name, out in out_dicts.items():
        src = src_dicts[sd_name]
        want = _oracle(src, model, (2, 3) if rect else None)
        assert out.keys() == src.keys()
        for k, v in out.items():
            if k in ("pos_embed", "patch_embed.proj.weight"):
                assert v.shape == want[k].shape, k
                torch.testing.assert_close(v, want[k], atol=1e-6, rtol=0)
            else:
                assert digest(v) == digest(src[k]), f"{k} changed"
        prefix = model.num_prefix_tokens if not model.no_embed_class else 0
        assert torch.equal(out["pos_embed"][:, :prefix], src["pos_embed"][:, :prefix])
        model.load_state_dict(out, strict=True)


def test_deit_container_kept_in_pth(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "deit.pth"
    res = run("convert", fixture("deit_distilled.pth"), dst, "--img-size", "48", "--json")
    assert res.exit_code == 0, res.stderr
    import json

    rep = json.loads(res.stdout)
    assert rep["state_dicts"] == ["model", "model_ema"]
    assert {(c["state_dict"], c["key"]) for c in rep["changes"]} == {("model", "pos_embed"), ("model_ema", "pos_embed")}
    src = load_any(fixture("deit_distilled.pth"))
    out = load_any(dst)
    assert list(out) == list(src)
    assert out["epoch"] == 3 and isinstance(out["args"], argparse.Namespace) and out["args"] == src["args"]
    assert digest(out["optimizer"]["state"][0]["exp_avg"]) == digest(src["optimizer"]["state"][0]["exp_avg"])
    assert out["optimizer"]["param_groups"] == src["optimizer"]["param_groups"]
    assert "optimizer state is kept" in res.stderr
    # EMA and model are converted the same way, not one of them only.
    assert out["model"]["pos_embed"].shape == out["model_ema"]["pos_embed"].shape == (1, 2 + 36, 16)


def test_deit_to_safetensors_says_what_is_left_out(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "deit.safetensors"
    res = run("convert", fixture("deit_distilled.pth"), dst, "--img-size", "48")
    assert res.exit_code == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "left out" in ln]
    assert len(lines) == 1 and "model_ema" in lines[0] and "optimizer" in lines[0] and "--select" in lines[0]
    src = load_any(fixture("deit_distilled.pth"))
    assert torch.equal(load_any(dst)["head.weight"], src["model"]["head.weight"])
    dst2 = tmp_path / "ema.safetensors"
    assert (
        run("convert", fixture("deit_distilled.pth"), dst2, "--img-size", "48", "--select", "model_ema").exit_code == 0
    )
    assert torch.equal(load_any(dst2)["head.weight"], src["model_ema"]["head.weight"])


def test_native_is_timm_for_timm(run: Any, tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run("convert", fixture("timm_vit_cls.pth"), a, "--img-size", "48").exit_code == 0
    assert run("convert", fixture("timm_vit_cls.pth"), b, "--img-size", "48", "--method", "timm").exit_code == 0
    assert torch.equal(load_any(a)["pos_embed"], load_any(b)["pos_embed"])


def test_other_methods_differ_and_follow_their_convention(run: Any, tmp_path: Path) -> None:
    src = load_any(fixture("timm_vit_cls.pth"))["pos_embed"]
    outs = {}
    for method in ("timm", "deit", "torchvision"):
        dst = tmp_path / f"{method}.safetensors"
        assert run("convert", fixture("timm_vit_cls.pth"), dst, "--img-size", "48", "--method", method).exit_code == 0
        outs[method] = load_any(dst)["pos_embed"]
    assert not torch.equal(outs["timm"], outs["deit"]) and not torch.equal(outs["deit"], outs["torchvision"])
    deit = resample_abs_pos_embed(src, [6, 6], [4, 4], num_prefix_tokens=1, antialias=False)
    assert torch.equal(outs["deit"], deit)
    tv = resample_abs_pos_embed(src, [6, 6], [4, 4], num_prefix_tokens=1, antialias=False, align_corners=True)
    assert torch.equal(outs["torchvision"], tv)


def test_interpolation_overrides(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    res = run(
        "convert", fixture("timm_vit_cls.pth"), dst, "--img-size", "48", "--patch", "12",
        "--interpolation", "bilinear", "--no-antialias",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    src = load_any(fixture("timm_vit_cls.pth"))
    out = load_any(dst)
    want_pos = resample_abs_pos_embed(src["pos_embed"], [4, 4], [4, 4], num_prefix_tokens=1)
    assert torch.equal(out["pos_embed"], want_pos)  # 48 / 12 = 4: grid unchanged
    want_patch = resample_patch_embed(
        src["patch_embed.proj.weight"], [12, 12], interpolation="bilinear", antialias=False
    )
    assert torch.equal(out["patch_embed.proj.weight"], want_patch)


def test_patch_method_interp(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    assert run("convert", fixture("timm_vit_cls.pth"), dst, "--patch", "4", "--patch-method", "interp").exit_code == 0
    src = load_any(fixture("timm_vit_cls.pth"))["patch_embed.proj.weight"]
    want = torch.nn.functional.interpolate(src, size=(4, 4), mode="bicubic", antialias=True)
    assert torch.equal(load_any(dst)["patch_embed.proj.weight"], want)


def test_grid_target(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    assert run("convert", fixture("timm_vit_cls.pth"), dst, "--grid", "3x5").exit_code == 0
    model = build_model(spec("timm_vit_cls.pth"), img_size=(24, 40), patch_size=8)
    model.load_state_dict(load_any(dst), strict=True)
