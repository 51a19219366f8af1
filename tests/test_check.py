"""``vitresize check``: strict loads and agreement for every family at the source geometry, deliberately broken
conversions caught by the default gates, ``--methods all``, the JSON schema, images folders, missing libraries,
and what is imported when."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT, fixture
from PIL import Image
from safetensors.torch import load_file, save_file

import vitresize
from vitresize.errors import MissingDependencyError, UsageError
from vitresize.fidelity.check import check
from vitresize.resample.conventions import METHODS

FAMILIES = {
    "timm": ("timm_vit_cls.pth", "48"),
    "deit": ("deit_distilled.pth", "48"),
    "torchvision": ("torchvision_vit.pth", "48"),
    "hf-folder": ("families/hf_vit", "48"),
    "open_clip": ("families/open_clip.pth", "48"),
    "vit_jax-npz": ("families/vit_jax.npz", "48"),
    "big_vision-npz": ("families/big_vision.npz", "48"),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few small images (the default sample photographs are checked once, below)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(6):
        smooth = np.kron(rng.random((6, 8, 3)), np.ones((10, 10, 1)))
        Image.fromarray((smooth * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def _same_geometry(src: Path, out: Path) -> Path:
    """CONVERTED with the source's geometry: a conversion that has nothing to change."""
    ins = vitresize.inspect(src)
    size = ins.embeddings[0].img_size
    assert size is not None
    dst = out / (src.name if src.is_dir() else f"same{src.suffix}")
    vitresize.convert(src, dst, img_size=size, force=True)
    return dst


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_agrees_with_itself(name: str, tmp_path: Path, photos: Path) -> None:
    src = fixture(FAMILIES[name][0])
    rep = check(src, _same_geometry(src, tmp_path), images=photos)
    assert rep.original.load.ok and rep.converted.load.ok, (rep.original.load, rep.converted.load)
    assert rep.ok
    s = rep.candidates[0].scores
    assert s is not None and s.images == 6
    if s.top1_agreement is not None:
        assert s.top1_agreement == 100.0
        assert s.top5_overlap == 100.0
    assert s.cosine_pooled > 0.999 and s.cosine_patch > 0.999


@pytest.mark.parametrize("name", ["timm", "hf-folder", "open_clip", "torchvision", "vit_jax-npz"])
def test_every_family_checks_a_real_conversion(name: str, tmp_path: Path, photos: Path) -> None:
    src = fixture(FAMILIES[name][0])
    dst = tmp_path / (src.name if src.is_dir() else f"out{src.suffix}")
    vitresize.convert(src, dst, img_size=FAMILIES[name][1])
    rep = check(src, dst, images=photos)
    assert rep.ok, rep.gates
    assert rep.converted.img_size == (48, 48)
    conv, ref = rep.candidates[0].scores, rep.candidates[1].scores
    assert conv == ref  # vitresize's own default conversion is the reference, bit for bit


# ------------------------------------------------------------------ broken conversions


@pytest.fixture(scope="module")
def positional(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A timm ViT on a non-square grid whose position table matters: a smooth, strong pattern (as a trained
    model's), so that a misplaced row changes what the model sees."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=(32, 48),
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=10,
    )
    with torch.no_grad():
        yy, xx = torch.meshgrid(torch.linspace(0, 1, 4), torch.linspace(0, 1, 6), indexing="ij")
        f = torch.randn(32, 3)
        wave = torch.sin(3 * (f[:, 0, None, None] * yy + f[:, 1, None, None] * xx) + f[:, 2, None, None])
        model.pos_embed[0, 1:] = 2 * wave.permute(1, 2, 0).reshape(24, 32)
        model.pos_embed[0, :1] = torch.randn(1, 32)
    path = tmp_path_factory.mktemp("positional") / "orig.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _convert(src: Path, dst: Path, **kw: Any) -> dict[str, torch.Tensor]:
    vitresize.convert(src, dst, from_img_size=(32, 48), force=True, **kw)
    return load_file(str(dst))


def _save(tensors: dict[str, torch.Tensor], path: Path, grid: str) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"vitresize.new_grid": grid})
    return path


def _broken(kind: str, src: Path, out: Path) -> Path:
    good = _convert(src, out / "good.safetensors", img_size=(48, 64))
    if kind == "good":
        return out / "good.safetensors"
    if kind == "prefix rows shifted":
        return _save({**good, "pos_embed": good["pos_embed"].roll(1, dims=1)}, out / "bad.safetensors", "6x8")
    if kind == "grid transposed":
        pe = _convert(src, out / "t.safetensors", img_size=(64, 48))["pos_embed"]  # an 8x6 grid ...
        rows = pe[:, 1:].reshape(1, 8, 6, 32).transpose(1, 2).reshape(1, 48, 32)  # ... read as 6x8
        return _save({**good, "pos_embed": torch.cat([pe[:, :1], rows], 1)}, out / "bad.safetensors", "6x8")
    assert kind == "kernel without PI"
    _convert(src, out / "bad.safetensors", img_size=(64, 96), patch=16, patch_method="interp")
    return out / "bad.safetensors"


@pytest.mark.parametrize("kind", ["prefix rows shifted", "grid transposed", "kernel without PI"])
def test_default_gates_catch_a_broken_conversion(kind: str, positional: Path, tmp_path: Path, run: Any) -> None:
    bad = _broken(kind, positional, tmp_path)
    result = run("check", positional, bad, "--from-img-size", "32x48", "--limit", "12", "--json")
    assert result.exit_code == 1
    d = json.loads(result.stdout)
    assert d["original"]["load"]["ok"] and d["converted"]["load"]["ok"]  # it loads: only the agreement tells
    assert not d["ok"] and any(not g["ok"] for g in d["gates"])
    result = run("check", positional, bad, "--from-img-size", "32x48", "--limit", "12")
    assert result.exit_code == 1
    assert "Error: check failed:" in result.stderr and "Traceback" not in result.stderr


def test_default_gates_pass_the_right_conversion(positional: Path, tmp_path: Path, run: Any) -> None:
    good = _broken("good", positional, tmp_path)
    result = run("check", positional, good, "--from-img-size", "32x48", "--limit", "24")
    assert result.exit_code == 0, result.stderr
    assert re.search(r"verdict\s+ok", result.stdout)


def test_absolute_gates(positional: Path, tmp_path: Path, run: Any) -> None:
    good = _broken("good", positional, tmp_path)
    rep = check(positional, good, from_img_size="32x48", limit=8, min_agreement=90, min_cosine=0.9)
    assert rep.ok and {g.name for g in rep.gates} >= {"min_agreement", "min_cosine"}
    bad = _broken("prefix rows shifted", positional, tmp_path)
    rep = check(positional, bad, from_img_size="32x48", limit=8, min_agreement=90, min_cosine=0.9)
    assert {"min_agreement", "min_cosine"} <= {g.name for g in rep.gates if not g.ok}
    result = run("check", positional, good, "--from-img-size", "32x48", "--limit", "8", "--min-cosine", "0.99999999")
    assert result.exit_code == 1
    assert "pooled-feature cosine" in result.stderr


@pytest.mark.parametrize(("flag", "value"), [("--min-agreement", "101"), ("--min-cosine", "nan"), ("--limit", "0")])
def test_gates_out_of_range_are_usage_errors(flag: str, value: str, run: Any) -> None:
    src = fixture("timm_vit_cls.pth")
    result = run("check", src, src, flag, value)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and flag in result.stderr


def test_methods_all_ranks_every_method(positional: Path, tmp_path: Path) -> None:
    dst = tmp_path / "p16.safetensors"
    _convert(positional, dst, img_size=(64, 96), patch=16)
    rep = check(positional, dst, from_img_size="32x48", limit=8, methods="all")
    names = [c.name for c in rep.candidates]
    assert names[:2] == ["converted", "reference"]
    assert set(names[2:]) == {*METHODS, "native (patch interp)"}
    ranked = [c.scores for c in rep.candidates[2:] if c.scores is not None]
    keys = [(-(s.top1_agreement or 0), -s.cosine_pooled, -s.cosine_patch) for s in ranked]
    assert keys == sorted(keys)
    # the kernel interpolated without PI agrees less than the default, which uses PI
    interp = next(c.scores for c in rep.candidates if c.name == "native (patch interp)")
    ref = rep.candidates[1].scores
    assert interp is not None and ref is not None and interp.cosine_patch < ref.cosine_patch


def test_methods_named(positional: Path, tmp_path: Path) -> None:
    good = _broken("good", positional, tmp_path)
    rep = check(positional, good, from_img_size="32x48", limit=4, methods=["torchvision", "big_vision"])
    assert [c.name for c in rep.candidates][2:] in (["torchvision", "big_vision"], ["big_vision", "torchvision"])
    with pytest.raises(UsageError, match="not a method"):
        check(positional, good, from_img_size="32x48", limit=4, methods=["bogus"])


# ------------------------------------------------------------------ JSON, images, errors


def test_json_schema(positional: Path, tmp_path: Path, run: Any) -> None:
    good = _broken("good", positional, tmp_path)
    result = run("check", positional, good, "--from-img-size", "32x48", "--limit", "5", "--json")
    assert result.exit_code == 0, result.stderr
    d = json.loads(result.stdout)
    assert set(d) == {
        "schema", "command", "ok", "original", "converted", "images", "candidates", "gates", "per_image", "warnings"
    }  # fmt: skip
    assert (d["schema"], d["command"], d["ok"]) == (1, "check", True)
    for side in ("original", "converted"):
        assert set(d[side]) == {"path", "family", "architecture", "load", "img_size", "patch", "grid", "window"}
        assert d[side]["load"] == {"ok": True, "missing": [], "unexpected": [], "mismatched": []}
        assert set(d[side]["architecture"]) == {"library", "name", "args", "source", "note"}
    assert d["converted"]["img_size"] == [48, 64]
    assert d["images"] == {"source": d["images"]["source"], "count": 5, "skipped": []}
    scores = {"images", "top1_agreement", "top5_overlap", "kl", "cosine_pooled", "cosine_patch"}
    for c in d["candidates"]:
        assert set(c) == {"name", "method", "patch_method", "scores", "note"}
        assert set(c["scores"]) == scores
    for g in d["gates"]:
        assert set(g) == {"name", "value", "threshold", "ok", "text"}
    assert len(d["per_image"]) == 5
    assert set(d["per_image"][0]) == {"image", "top1", "agree", "top5_overlap", "kl", "cosine_pooled", "cosine_patch"}


def test_default_images_are_the_sample_photographs() -> None:
    rep = check(fixture("timm_vit_cls.pth"), fixture("timm_vit_cls.pth"))
    assert rep.images == 80
    assert "scikit-image" in rep.image_source
    assert rep.per_image[0].image == "astronaut.png"
    assert rep.ok


def test_images_folder_skips_broken_files(tmp_path: Path, photos: Path, run: Any) -> None:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.open(photos / "img0.png").save(folder / "a.jpg")
    Image.open(photos / "img1.png").save(folder / "sub" / "b.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "notes.txt").write_text("not an image")
    (folder / "link.png").symlink_to(photos / "img2.png")
    src = fixture("timm_vit_cls.pth")
    rep = check(src, src, images=folder)
    assert rep.images == 2
    assert [s.image for s in rep.per_image] == ["a.jpg", "sub/b.png"]
    skipped = {Path(s.path).name: s.reason for s in rep.skipped}
    assert set(skipped) == {"corrupt.png", "notes.txt", "link.png"}
    assert "symbolic link" in skipped["link.png"]
    result = run("check", src, src, "--images", folder)
    assert result.exit_code == 0, result.stderr
    assert "corrupt.png" in result.stderr and "skipped" in result.stderr
    result = run("check", src, src, "--images", folder, "--json")
    assert {Path(s["path"]).name for s in json.loads(result.stdout)["images"]["skipped"]} == set(skipped)


def test_images_folder_with_no_image(tmp_path: Path, run: Any) -> None:
    (tmp_path / "a.txt").write_text("x")
    src = fixture("timm_vit_cls.pth")
    result = run("check", src, src, "--images", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "holds no image" in result.stderr


def test_a_load_that_fails_is_reported(tmp_path: Path, run: Any) -> None:
    src = fixture("timm_vit_cls.pth")
    sd = torch.load(src, weights_only=True)
    sd = dict(sd.get("state_dict", sd)) if isinstance(sd, dict) else sd
    sd["extra.weight"] = torch.zeros(3)
    bad = tmp_path / "extra.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(bad))
    rep = check(src, bad, limit=2)
    assert not rep.ok and not rep.converted.load.ok
    assert rep.converted.load.unexpected == ("extra.weight",)
    assert rep.candidates == ()
    result = run("check", src, bad, "--limit", "2")
    assert result.exit_code == 1
    assert "does not load strictly" in result.stderr and "extra.weight" in result.stderr


def test_checkpoints_of_two_libraries(run: Any) -> None:
    result = run("check", fixture("timm_vit_cls.pth"), fixture("families/hf_vit"), "--limit", "1")
    assert result.exit_code == 2
    assert "compares a checkpoint with its own conversion" in result.stderr


def test_missing_library_is_one_line(monkeypatch: pytest.MonkeyPatch, run: Any) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)
    src = fixture("families/open_clip.pth")
    with pytest.raises(MissingDependencyError, match="pip install open_clip_torch"):
        check(src, src, limit=1)
    result = run("check", src, src, "--limit", "1")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: vitresize check needs open_clip")
    assert result.stderr.count("\n") == 1


def test_missing_sample_images_library(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    monkeypatch.setitem(sys.modules, "skimage", None)
    src = fixture("timm_vit_cls.pth")
    with pytest.raises(MissingDependencyError, match="pip install scikit-image"):
        check(src, src)


def test_convert_check(tmp_path: Path, run: Any) -> None:
    src = fixture("timm_vit_cls.pth")
    result = run("convert", src, tmp_path / "out.safetensors", "--img-size", "48", "--check", "--json")
    assert result.exit_code == 0, result.stderr
    d = json.loads(result.stdout)
    assert d["command"] == "convert" and d["check"]["ok"] is True
    assert d["check"]["converted"]["img_size"] == [48, 48]


def test_convert_check_fails_on_a_kernel_without_pi(positional: Path, tmp_path: Path, run: Any) -> None:
    out = tmp_path / "out.safetensors"
    result = run(
        "convert", positional, out, "--from-img-size", "32x48", "--img-size", "64x96", "--patch", "16",
        "--patch-method", "interp", "--check",
    )  # fmt: skip
    assert result.exit_code == 1
    assert f"wrote {out}, but it does not pass the check" in result.stderr
    assert out.exists()


@pytest.mark.slow  # ~5 s: a fresh interpreter importing torch and timm
def test_imports() -> None:
    """check imports no model library until it runs, and then only the one it needs."""
    code = (
        "import sys, vitresize.cli, vitresize.fidelity.check;"
        "assert not {'torch', 'timm', 'transformers', 'open_clip'} & set(sys.modules), sys.modules.keys();"
        "from vitresize.fidelity.check import check;"
        f"check({str(fixture('timm_vit_cls.pth'))!r}, {str(fixture('timm_vit_cls.pth'))!r}, limit=1);"
        "print(sorted({'timm', 'transformers', 'open_clip'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "['timm']"


def test_metrics_nan_free_without_head(tmp_path: Path, photos: Path) -> None:
    src = fixture("families/open_clip.pth")
    rep = check(src, src, images=photos)
    s = rep.candidates[0].scores
    assert s is not None and s.top1_agreement is None and s.kl is None
    assert not math.isnan(s.cosine_pooled)
    assert [g.name for g in rep.gates] == ["cosine_pooled vs reference", "cosine_patch vs reference"]


@pytest.mark.parametrize(
    ("name", "args", "target"),
    [
        ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, {"img_size": 96, "window": 3}),
        ("beit_base_patch16_224", {"img_size": 32, "patch_size": 8}, {"img_size": 48}),
    ],
)
def test_other_timm_families_from_their_config(
    name: str, args: dict[str, Any], target: dict[str, Any], tmp_path: Path, photos: Path
) -> None:
    """A timm hub folder names its architecture in config.json: check builds it (Swin, BEiT: relative tables)."""
    from test_architectures import BEIT, SWIN, _model
    from timm.models._hub import save_for_hf

    small = {**(SWIN if "swin" in name else BEIT), **args}
    save_for_hf(_model(name, **small), tmp_path / "src", model_args=small, safe_serialization=True)
    vitresize.convert(tmp_path / "src", tmp_path / "out", **target)
    rep = check(tmp_path / "src", tmp_path / "out", images=photos)
    assert rep.original.architecture.source == "config" and rep.original.architecture.name == name
    assert rep.ok, rep.gates
    assert rep.converted.img_size == (target["img_size"],) * 2
    assert rep.candidates[0].scores == rep.candidates[1].scores


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank
    return im.size


@pytest.mark.slow  # ~7 s: matplotlib's first import and three figures (tests/test_plot.py covers the drawing)
def test_plot_of_every_command(positional: Path, tmp_path: Path, run: Any) -> None:
    result = run("inspect", positional, "--from-img-size", "32x48", "--plot", tmp_path / "inspect.png")
    assert result.exit_code == 0, result.stderr
    one = _png(tmp_path / "inspect.png")
    out = tmp_path / "out.safetensors"
    result = run(
        "convert", positional, out, "--from-img-size", "32x48", "--img-size", "48x64", "--plot", tmp_path / "c.png"
    )
    assert result.exit_code == 0, result.stderr
    two = _png(tmp_path / "c.png")
    assert two[0] > 1.5 * one[0]  # before and after, side by side
    args = ("--from-img-size", "32x48", "--limit", "4", "--methods", "timm,torchvision")
    result = run("check", positional, out, *args, "--plot", tmp_path / "check.png")
    assert result.exit_code == 0, result.stderr
    bars = _png(tmp_path / "check.png")
    assert bars[1] > two[1]  # the agreement bars below
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "check.png", "inspect.png", "out.safetensors"]


def test_plot_needs_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, run: Any) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = run("inspect", fixture("timm_vit_cls.pth"), "--plot", tmp_path / "x.png")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "pip install matplotlib" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", [["--check"], ["--plot", "x.png"]])
def test_check_and_plot_need_an_output(flag: list[str], tmp_path: Path, run: Any) -> None:
    result = run("convert", fixture("timm_vit_cls.pth"), tmp_path / "o.safetensors", "--img-size", "48", "-n", *flag)
    assert result.exit_code == 2
    assert "--dry-run" in result.stderr and result.stderr.count("\n") == 1


# ------------------------------------------------------------------ found by review


def test_a_broken_head_fails(tmp_path: Path, photos: Path, run: Any) -> None:
    src = fixture("timm_vit_cls.pth")
    dst = tmp_path / "out.safetensors"
    vitresize.convert(src, dst, img_size=48)
    sd = load_file(str(dst))
    del sd["head.weight"], sd["head.bias"]
    save_file(sd, str(tmp_path / "headless.safetensors"), metadata={"vitresize.new_grid": "6x6"})
    result = run("check", src, tmp_path / "headless.safetensors", "--images", photos, "--json")
    assert result.exit_code == 1  # built as the original (10 classes), it does not load
    assert json.loads(result.stdout)["converted"]["load"]["missing"] == ["head.weight", "head.bias"]
    rep = check(fixture("torchvision_vit.pth"), fixture("torchvision_vit.pth"), images=photos)
    assert rep.ok and "classifier head" not in {g.name for g in rep.gates}


def test_non_square_torch_output_of_vitresize(tmp_path: Path, photos: Path, run: Any) -> None:
    """A non-square .pth states no grid: 4x6 + 1 rows also read as a 5x5 grid without a class row."""
    src = fixture("timm_vit_cls.pth")
    out = tmp_path / "out.pth"
    result = run("convert", src, out, "--img-size", "32x48", "--check", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["check"]["converted"]["grid"] == [4, 6]
    result = run("check", src, out, "--images", photos)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "--img-size" in result.stderr and "prefix row" in result.stderr
    result = run("check", src, out, "--images", photos, "--img-size", "32x48")
    assert result.exit_code == 0, result.stderr


def test_converted_is_built_as_the_original(tmp_path: Path, photos: Path) -> None:
    """A JAX .npz (2 heads, read from its query kernel) against timm's own conversion of it, a bare .pth whose
    head count would be guessed (1): CONVERTED is built with the original's architecture."""
    import timm
    from timm.models.vision_transformer import _load_weights

    model = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=48, patch_size=8, embed_dim=16, depth=2, num_heads=2,
        mlp_ratio=2.0, num_classes=10, qkv_bias=True,
    )  # fmt: skip
    _load_weights(model, str(fixture("families/vit_jax.npz")))  # timm resamples the table itself (bilinear)
    torch.save(model.state_dict(), tmp_path / "timm48.pth")
    rep = check(fixture("families/vit_jax.npz"), tmp_path / "timm48.pth", images=photos)
    assert rep.original.architecture.args["num_heads"] == 2
    assert rep.converted.architecture == rep.original.architecture
    assert rep.ok  # bilinear (timm's JAX loader) vs the reference's convention: close enough


def test_stale_config_in_a_converted_folder(tmp_path: Path, photos: Path) -> None:
    import shutil

    src = fixture("families/hf_vit")
    vitresize.convert(src, tmp_path / "out", img_size=48)
    shutil.copy(src / "config.json", tmp_path / "out" / "config.json")  # says 32 px: transformers would fail
    rep = check(src, tmp_path / "out", images=photos)
    assert not rep.ok and not rep.converted.load.ok
    assert any("config.json: image size 32x32" in m for m in rep.converted.load.mismatched)


def test_library_that_cannot_run_the_geometry(tmp_path: Path, photos: Path, run: Any) -> None:
    src = fixture("families/hf_dinov2")
    vitresize.convert(src, tmp_path / "out", img_size="28x42")
    result = run("check", src, tmp_path / "out", "--images", photos)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "transformers cannot run" in result.stderr


@pytest.mark.parametrize("device", ["tpu", "CPU"])
def test_device_spelling(device: str, run: Any) -> None:
    src = fixture("timm_vit_cls.pth")
    result = run("check", src, src, "--device", device)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1


def test_a_bad_plot_is_refused_before_anything_is_written(tmp_path: Path, run: Any) -> None:
    out = tmp_path / "out.safetensors"
    result = run("convert", fixture("timm_vit_cls.pth"), out, "--img-size", "48", "--plot", tmp_path / "c.jpg")
    assert result.exit_code == 2 and ".png" in result.stderr
    assert not out.exists()
    result = run("check", fixture("timm_vit_cls.pth"), fixture("timm_vit_cls.pth"), "--plot", tmp_path / "no" / "c.png")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_images_are_shrunk_and_bombs_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image as PILImage

    from vitresize.fidelity.images import folder_images

    Image.new("RGB", (2000, 1000), (200, 10, 10)).save(tmp_path / "big.png")
    Image.new("RGB", (300, 300), (10, 10, 200)).save(tmp_path / "bomb.png")
    (tmp_path / ".hidden.png").write_bytes((tmp_path / "big.png").read_bytes())
    Image.new("RGB", (100, 100), (10, 200, 10)).save(tmp_path / "small.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 60_000)  # bomb.png (90,000 px) warns; big.png errors
    images, skipped = folder_images(tmp_path, max_side=64)
    assert [n for n, _ in images] == ["small.png"]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert set(reasons) == {"big.png", "bomb.png", ".hidden.png"}
    assert "decompression bomb" in reasons["bomb.png"]
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000_000)
    images, _ = folder_images(tmp_path, max_side=64)
    assert [(n, im.size) for n, im in images] == [
        ("big.png", (64, 32)),
        ("bomb.png", (64, 64)),
        ("small.png", (64, 64)),
    ]


def test_other_timm_family_without_config(tmp_path: Path, run: Any) -> None:
    from test_architectures import BEIT, _model

    torch.save(_model("beit_base_patch16_224", img_size=32, patch_size=8, **BEIT).state_dict(), tmp_path / "b.pth")
    result = run("check", tmp_path / "b.pth", tmp_path / "b.pth", "--limit", "1")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "--model NAME" in result.stderr


def test_methods_as_one_string(positional: Path, tmp_path: Path) -> None:
    good = _broken("good", positional, tmp_path)
    rep = check(positional, good, from_img_size="32x48", limit=2, methods="timm, torchvision,timm")
    assert sorted(c.name for c in rep.candidates[2:]) == ["timm", "torchvision"]
