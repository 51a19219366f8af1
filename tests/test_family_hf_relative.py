"""Hugging Face BEiT / Data2Vec-vision and Swin / Swinv2 (families ``hf-beit``, ``hf-swin``, ``hf-swinv2``),
against transformers itself.

Oracles:

* BEiT / Data2Vec-vision: transformers resamples its relative tables at run time
  (``BeitRelativePositionBias.forward`` / ``Data2VecVisionRelativePositionBias.forward``: bilinear,
  ``align_corners=False``, class rows kept) and its absolute table (``interpolate_pos_encoding``: bicubic, no
  antialias). The model at the old size run on an image of the new size must give **exactly** the output of the
  model built at the new size from the converted weights; each bias module must give the same bias.
* Swin: transformers has no resampler for its tables; the convention is timm's ``resize_rel_pos_bias_table``
  (called with the old window). Its absolute table follows ``SwinEmbeddings.interpolate_pos_encoding``: exact
  equality of outputs as for BEiT.
* Swinv2: nothing changes; the output loads with a new ``window_size`` in the config.

Strict loads: transformers 5 names some keys differently in memory than on disk (``save_pretrained`` writes the
older names), so the in-memory state dict is converted and loaded with ``load_state_dict(strict=True)``, and the
``save_pretrained`` folder is converted and loaded with ``from_pretrained`` (no missing, unexpected or mismatched key).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.layers.patch_embed import resample_patch_embed
from timm.layers.pos_embed import resample_abs_pos_embed
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table
from typer.testing import CliRunner

import vitresize
from vitresize.cli import app
from vitresize.errors import UsageError, VitresizeError
from vitresize.resample.hf_tables import resize_rel_bias_hf
from vitresize.resample.tables import resize_rel_bias

transformers = pytest.importorskip("transformers")

BEIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 8}
SWIN = {"embed_dim": 32, "depths": [1, 1], "num_heads": [2, 2], "patch_size": 4}
PER_LAYER = {"use_relative_position_bias": True}
SHARED_ABS = {"use_shared_relative_position_bias": True, "use_absolute_position_embeddings": True}


def _randomize(model: Any) -> Any:
    torch.manual_seed(0)
    with torch.no_grad():  # transformers zero-inits the tables: random ones, so that resampling shows
        for name, p in model.named_parameters():
            if "position" in name or "cls_token" in name:
                p.normal_()
    return model.eval()


def _beit(cls_name: str, img: int, **kw: Any) -> Any:
    cls = getattr(transformers, cls_name)
    config_cls = transformers.Data2VecVisionConfig if "Data2Vec" in cls_name else transformers.BeitConfig
    torch.manual_seed(0)
    return _randomize(cls(config_cls(**BEIT, image_size=img, **kw)))


def _swin(cls_name: str, img: Any, window: int, **kw: Any) -> Any:
    cls = getattr(transformers, cls_name)
    config_cls = transformers.Swinv2Config if "v2" in cls_name else transformers.SwinConfig
    torch.manual_seed(0)
    return _randomize(cls(config_cls(**{**SWIN, **kw}, image_size=img, window_size=window)))


def _save_pretrained(model: Any, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


def _from_pretrained(cls: Any, path: Path, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _out(model: Any, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(x, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state  # type: ignore[no-any-return]


def _unchanged(src: dict[str, torch.Tensor], got: dict[str, torch.Tensor], changed: set[str]) -> None:
    assert set(src) == set(got)
    for k, v in src.items():
        if k not in changed:
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def _bias_modules(model: Any) -> list[Any]:
    return [m for m in model.modules() if type(m).__name__.endswith("RelativePositionBias")]


# ---------------------------------------------------------------- BEiT / Data2Vec-vision


@pytest.mark.parametrize(
    ("cls_name", "variant", "img"),
    [
        ("BeitModel", PER_LAYER, 48),  # larger
        ("BeitModel", SHARED_ABS, 16),  # smaller, shared table + absolute table
        ("BeitForImageClassification", PER_LAYER, 64),  # prefix beit.
        ("Data2VecVisionModel", SHARED_ABS, 48),
        ("Data2VecVisionForImageClassification", PER_LAYER, 24),  # prefix data2vec_vision.
    ],
)
def test_hf_beit_folder_equals_transformers_at_run_time(
    cls_name: str, variant: dict[str, Any], img: int, tmp_path: Path
) -> None:
    """The converted folder, loaded by from_pretrained, computes bit for bit what the source model computes for
    an image of the new size (transformers resamples its tables itself at run time)."""
    old = _beit(cls_name, 32, **variant)
    src = _save_pretrained(old, tmp_path / "src")
    rep = vitresize.convert(src, tmp_path / "out", img_size=img)
    e = rep.plan.models[0].embedding
    assert e.family == "hf-beit" and e.geometry_from == "config.json"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_size"] == img
    tables = {c.key for c in rep.plan.changes if c.op == "hf_rel_bias"}
    assert len(tables) == (1 if "use_shared_relative_position_bias" in variant else 2)
    before, got = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    _unchanged(before, got, {c.key for c in rep.plan.changes})
    for k in tables:  # the class rows are kept as they are
        assert torch.equal(got[k][-3:], before[k][-3:])
    new = _from_pretrained(type(old), tmp_path / "out")
    g = img // 8
    for a, b in zip(_bias_modules(old), _bias_modules(new), strict=True):
        with torch.no_grad():  # transformers' own resampler, at the new grid, from both tables
            assert torch.equal(a((g, g)), b((g, g)))
    x = torch.randn(2, 3, img, img)
    assert torch.equal(_out(old, x, interpolate_pos_encoding=True), _out(new, x))


def test_hf_beit_memory_names_load_strict(tmp_path: Path) -> None:
    """transformers 5's in-memory names (layers.N.relative_position_bias, shared_position_bias) are found too;
    without a config.json the source grid is given."""
    old = _beit("BeitModel", 32, use_relative_position_bias=True, use_shared_relative_position_bias=True)
    sd = {k: v.contiguous() for k, v in old.state_dict().items()}
    assert "shared_position_bias.relative_position_bias_table" in sd
    save_file(sd, str(tmp_path / "m.safetensors"))
    info = vitresize.inspect(tmp_path / "m.safetensors", from_img_size=32)
    e = info.embeddings[0]
    assert e.family == "hf-beit" and e.scheme == "relative" and e.source is not None and e.source.grid == (4, 4)
    rep = vitresize.convert(tmp_path / "m.safetensors", tmp_path / "o.safetensors", img_size=40, from_img_size=32)
    assert len(rep.plan.changes) == 3
    got = load_file(tmp_path / "o.safetensors")
    cfg = transformers.BeitConfig(
        **BEIT, image_size=40, use_relative_position_bias=True, use_shared_relative_position_bias=True
    )
    new = transformers.BeitModel(cfg).eval()
    new.load_state_dict(got, strict=True)
    x = torch.randn(1, 3, 40, 40)
    assert torch.equal(_out(old, x, interpolate_pos_encoding=True), _out(new, x))


def test_hf_beit_patch_change_loads_strict(tmp_path: Path) -> None:
    """A new patch: the kernel is PI-resized (timm's resample_patch_embed), the tables follow the new grid as
    transformers resamples them."""
    old = _beit("Data2VecVisionModel", 32, use_relative_position_bias=True)
    src = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(src))
    rep = vitresize.convert(src, tmp_path / "o.safetensors", patch=4, from_img_size=32)
    assert rep.plan.models[0].target.grid == (8, 8)
    got, before = load_file(tmp_path / "o.safetensors"), load_file(src)
    cfg = transformers.Data2VecVisionConfig(**{**BEIT, "patch_size": 4}, image_size=32, use_relative_position_bias=True)
    transformers.Data2VecVisionModel(cfg).load_state_dict(got, strict=True)
    k = "embeddings.patch_embeddings.projection.weight"
    want = resample_patch_embed(before[k], [4, 4], interpolation="bicubic", antialias=True)
    torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-6)
    for a in _bias_modules(old):  # transformers' table for an 8x8 grid input
        t = "encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table"
        assert torch.equal(resize_rel_bias_hf(before[t], old_grid=(4, 4), new_grid=(8, 8)), got[t])
        with torch.no_grad():
            index = a.generate_relative_position_index((8, 8))
            want_bias = got[t][index.view(-1)].view(65, 65, -1).permute(2, 0, 1).unsqueeze(0)
            assert torch.equal(a((8, 8)), want_bias)
        break


def test_hf_beit_convention_is_not_timms() -> None:
    """transformers' bilinear resampling and timm's geometric recipe differ: the choice matters."""
    t = torch.randn(7 * 7 + 3, 2)
    hf = resize_rel_bias_hf(t, old_grid=(4, 4), new_grid=(6, 6))
    timm_like = resize_rel_bias(t, old_window=(4, 4), new_window=(6, 6), extra_rows=3)
    assert hf.shape == timm_like.shape == (11 * 11 + 3, 2)
    assert not torch.allclose(hf, timm_like, atol=1e-3)
    assert resize_rel_bias_hf(t, old_grid=(4, 4), new_grid=(4, 4)) is t


def test_hf_beit_method_timm_uses_timms_recipe(tmp_path: Path) -> None:
    """--method timm resamples the tables as timm's resize_rel_pos_bias_table (and the absolute table with
    timm's antialiased bicubic); --method beit's cubic spline needs a grid of 3."""
    old = _beit("BeitModel", 32, **SHARED_ABS)
    src = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(src))
    vitresize.convert(src, tmp_path / "o.safetensors", img_size=48, from_img_size=32, method="timm")
    got, before = load_file(tmp_path / "o.safetensors"), load_file(src)
    k = "shared_position_bias.relative_position_bias_table"
    want = resize_rel_pos_bias_table(before[k], new_window_size=(6, 6), new_bias_shape=(124, 2))
    torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-6)
    a = "embeddings.position_embeddings"
    torch.testing.assert_close(got[a], resample_abs_pos_embed(before[a], [6, 6], [4, 4]), rtol=1e-6, atol=1e-6)
    # the cubic spline needs 3x3 of source (4x4 here); any target, even 2x2, is a point of it
    vitresize.convert(src, tmp_path / "b.safetensors", img_size=16, from_img_size=32, method="beit")
    assert (tmp_path / "b.safetensors").exists()


def test_hf_beit_legacy_index_is_regenerated(tmp_path: Path) -> None:
    """Older files saved relative_position_index (transformers ignores it on load): it is rewritten for the new
    grid, equal to transformers' own index."""
    old = _beit("BeitForImageClassification", 32, use_relative_position_bias=True)
    src = _save_pretrained(old, tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    idx = transformers.models.beit.modeling_beit.BeitRelativePositionBias.generate_relative_position_index
    key = "beit.encoder.layer.0.attention.attention.relative_position_bias.relative_position_index"
    sd[key] = idx((4, 4)).clone()
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    rep = vitresize.convert(src, tmp_path / "out", img_size=48)
    assert {c.op for c in rep.plan.changes} == {"hf_rel_bias", "rel_index"}
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got[key].dtype == torch.int64 and torch.equal(got[key], idx((6, 6)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = transformers.BeitForImageClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]


def test_hf_beit_refusals(tmp_path: Path) -> None:
    old = _beit("BeitModel", 32, **SHARED_ABS)
    src = _save_pretrained(old, tmp_path / "src")
    with pytest.raises(VitresizeError, match=r"square image_size .* 4x6 grid"):
        vitresize.convert(src, tmp_path / "a", img_size="32x48")
    with pytest.raises(VitresizeError, match=r"square image_size .* 8x8 grid of 8x4 patches"):
        vitresize.convert(src, tmp_path / "b", img_size="64x32", patch="8x4")
    with pytest.raises(UsageError, match="windowed attention"):
        vitresize.convert(src, tmp_path / "c", window=2)
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(VitresizeError, match="does not span a 6x6 grid"):  # a source size that does not fit
        vitresize.convert(tmp_path / "m.safetensors", tmp_path / "e.safetensors", img_size=64, from_img_size=48)
    assert not any((tmp_path / n).exists() for n in "abc") and not (tmp_path / "e.safetensors").exists()
    # without a config.json, the grid is read from the tables
    rep = vitresize.convert(tmp_path / "m.safetensors", tmp_path / "d.safetensors", img_size=48)
    assert rep.plan.models[0].embedding.geometry_from == "table shape"


# ---------------------------------------------------------------- Swin


@pytest.mark.parametrize(
    ("src_img", "src_window", "kw"),
    [
        (32, 2, {"img_size": 64, "window": 4}),  # larger
        (64, 4, {"img_size": 32, "window": 2}),  # smaller
        (32, 2, {"window": 3}),  # a window that does not divide the grid: transformers pads
        ((32, 64), 2, {"img_size": "64x32", "window": 4}),  # non-square images
        (32, 2, {"patch": 2, "window": 4}),  # a new patch
    ],
)
def test_hf_swin_window_matches_timm_and_loads(
    src_img: Any, src_window: int, kw: dict[str, Any], tmp_path: Path
) -> None:
    """Tables resized with timm's resize_rel_pos_bias_table (old window given); the in-memory state dict loads
    strictly into SwinModel built at the target, and the save_pretrained folder with from_pretrained."""
    old = _swin("SwinModel", src_img, src_window)
    sd = {k: v.contiguous() for k, v in old.state_dict().items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    from_img = src_img if isinstance(src_img, int) else f"{src_img[0]}x{src_img[1]}"
    rep = vitresize.convert(tmp_path / "m.safetensors", tmp_path / "o.safetensors", from_img_size=from_img, **kw)
    got = load_file(tmp_path / "o.safetensors")
    w = kw["window"]
    changed = {c.key for c in rep.plan.changes}
    assert {c.op for c in rep.plan.changes} <= {"rel_bias", "patch_embed"}
    assert len([k for k in changed if k.endswith("relative_position_bias_table")]) == 2
    for k in changed:
        if k.endswith("relative_position_bias_table"):
            want = resize_rel_pos_bias_table(
                sd[k], new_window_size=(w, w), new_bias_shape=((2 * w - 1) ** 2, 2), old_window_size=(src_window,) * 2
            )
            torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-6)
    _unchanged(sd, got, changed)
    t = rep.plan.models[0].target
    img = t.img_size if t.img_size[0] != t.img_size[1] else t.img_size[0]
    new = _swin("SwinModel", img, w, patch_size=t.patch[0])
    new.load_state_dict(got, strict=True)
    assert _out(new, torch.randn(1, 3, *t.img_size)).isfinite().all()
    # The same from a save_pretrained folder (on-disk names attention.self.*), loaded by from_pretrained.
    folder = _save_pretrained(old, tmp_path / "src")
    vitresize.convert(folder, tmp_path / "out", **kw)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["window_size"] == w and config["patch_size"] == t.patch[0]
    _from_pretrained(transformers.SwinModel, tmp_path / "out")


def test_hf_swin_absolute_table_equals_transformers_at_run_time(tmp_path: Path) -> None:
    """use_absolute_embeddings: [1, H*W, D] without a class row, as transformers' interpolate_pos_encoding
    (bicubic, no antialias) makes it: outputs equal bit for bit. Prefix swin."""
    old = _swin("SwinForImageClassification", 32, 2, use_absolute_embeddings=True, num_labels=3)
    src = _save_pretrained(old, tmp_path / "src")
    rep = vitresize.convert(src, tmp_path / "out", img_size=64)
    assert [(c.key, c.op) for c in rep.plan.changes] == [("swin.embeddings.position_embeddings", "abs_table")]
    new = _from_pretrained(transformers.SwinForImageClassification, tmp_path / "out")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_out(old, x, interpolate_pos_encoding=True), _out(new, x))


def test_hf_swin_legacy_index_is_regenerated(tmp_path: Path) -> None:
    old = _swin("SwinModel", 32, 2)
    src = _save_pretrained(old, tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    bias = transformers.models.swin.modeling_swin.SwinRelativePositionBias
    key = "encoder.layers.1.blocks.0.attention.self.relative_position_index"
    sd[key] = bias(2, (2, 2))._create_relative_position_index()
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    rep = vitresize.convert(src, tmp_path / "out", window=4)
    assert sorted(c.op for c in rep.plan.changes) == ["rel_bias", "rel_bias", "rel_index"]
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(got[key], bias(2, (4, 4))._create_relative_position_index())
    _from_pretrained(transformers.SwinModel, tmp_path / "out")  # transformers ignores the index


def test_hf_donut_swin_saved_index_is_regenerated(tmp_path: Path) -> None:
    """DonutSwin (a copy of the older Swin code) still saves relative_position_index: it follows the window."""
    config = transformers.DonutSwinConfig(**SWIN, image_size=32, window_size=2)
    src = _save_pretrained(_randomize(transformers.DonutSwinModel(config)), tmp_path / "src")
    rep = vitresize.convert(src, tmp_path / "out", img_size=64, window=4)
    assert sorted(c.op for c in rep.plan.changes) == ["rel_bias", "rel_bias", "rel_index", "rel_index"]
    new = _from_pretrained(transformers.DonutSwinModel, tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    for name, buffer in new.named_buffers():
        if name.endswith("relative_position_index"):
            assert torch.equal(got[name], buffer), name


def test_hf_swin_refusals(tmp_path: Path) -> None:
    """transformers' Swin keeps one window in every stage and crashes where a stage's grid is smaller."""
    src = _save_pretrained(_swin("SwinModel", 32, 2), tmp_path / "src")
    with pytest.raises(VitresizeError, match=r"stage 1 of a 8x8 patch grid is 4x4, smaller than the window"):
        vitresize.convert(src, tmp_path / "a", window=8)
    with pytest.raises(VitresizeError, match=r"stage 1 of a 2x2 patch grid is 1x1"):
        vitresize.convert(src, tmp_path / "b", img_size=8)
    with pytest.raises(VitresizeError, match="one square window_size"):
        vitresize.convert(src, tmp_path / "c", window="4x2")
    old = _swin("SwinModel", 32, 4)
    with pytest.raises(RuntimeError):  # what the refused targets would do in transformers
        _out(old, torch.randn(1, 3, 16, 16))
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(VitresizeError, match="pass from_img_size"):  # --window alone: the stage grids are unknown
        vitresize.convert(tmp_path / "m.safetensors", tmp_path / "d.safetensors", window=2)


def test_hf_swinv2_changes_nothing(tmp_path: Path) -> None:
    """Swinv2's bias is an MLP of offsets: a new window or image size changes no tensor (prefix swinv2.)."""
    old = _swin("Swinv2ForImageClassification", 32, 2, num_labels=3)
    src = _save_pretrained(old, tmp_path / "src")
    e = vitresize.inspect(src).embeddings[0]
    assert e.family == "hf-swinv2" and e.key_prefix == "swinv2." and "continuous_position_bias_mlp" in e.scheme_text
    rep = vitresize.convert(src, tmp_path / "out", img_size=64, window=4)
    assert rep.plan.changes == () and "nothing to resample" in rep.warnings[0]
    _unchanged(load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors"), set())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["window_size"], config["image_size"]) == (4, 64)
    # pretrained_window_sizes is left as it was (0: offsets scaled by the new window); the source window (2)
    # keeps the MLP's inputs for the old offsets as they were.
    assert set(config["pretrained_window_sizes"]) == {0}
    new = _from_pretrained(transformers.Swinv2ForImageClassification, tmp_path / "out", pretrained_window_sizes=[2, 2])
    assert _out(new, torch.randn(1, 3, 64, 64)).isfinite().all()
    broken = _swin("Swinv2Model", 32, 2, use_absolute_embeddings=True)
    _save_pretrained(broken, tmp_path / "abs")
    with pytest.raises(VitresizeError, match="one row too long"):
        vitresize.convert(tmp_path / "abs", tmp_path / "x", img_size=64)


def test_hf_relative_inspect_and_cli(tmp_path: Path) -> None:
    src = _save_pretrained(_swin("SwinForImageClassification", 32, 2, num_labels=3), tmp_path / "src")
    e = vitresize.inspect(src).embeddings[0]
    assert (e.family, e.scheme, e.key_prefix, e.window) == ("hf-swin", "relative", "swin.", (2, 2))
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out"), "--window", "4", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    text = json.dumps(data)
    assert "hf-swin" in text and "relative_position_bias_table" in text


def test_backbone_config_folder_is_refused(tmp_path: Path) -> None:
    """A head on a backbone (DPT, UperNet) keeps the backbone's sizes in backbone_config, which is not rewritten:
    a folder conversion is refused rather than written with a config that does not match its weights."""
    src = _save_pretrained(_beit("BeitModel", 32, **PER_LAYER), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["backbone_config"] = {"model_type": "beit", "image_size": 32}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="backbone_config"):
        vitresize.convert(src, tmp_path / "out", img_size=48)
    assert not (tmp_path / "out").exists()
