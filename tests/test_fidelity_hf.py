"""The transformers runner of ``vitresize check`` (:mod:`vitresize.fidelity.lib_hf`), against transformers itself.

Oracle: the fixture's own class (``make_families.HF_SPECS``) loaded by transformers' ``from_pretrained`` from the
fixture folder (every key fitting, transformers' own renamings applied); its logits, the head's input and the last
hidden state's patch tokens (prefix rows dropped by their known count) must equal the runner's to 1e-5.
Preprocessing must equal the image processor transformers uses for the model type, at the model's input size.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vitresize.errors import CheckpointFormatError, GeometryError, UsageError
from vitresize.fidelity.base import Side
from vitresize.fidelity.lib_hf import build
from vitresize.fidelity.sides import convert_side, read_side
from vitresize.options import Options, Target

transformers = pytest.importorskip("transformers")

import make_families  # noqa: E402  (fixtures/ is on sys.path via conftest)

FAM = Path(__file__).resolve().parent.parent / "fixtures" / "families"

PREFIX_ROWS = {"hf_vit": 1, "hf_deit": 2, "hf_dinov2": 1, "hf_dinov2_reg": 5, "hf_clip": 1, "hf_siglip": 0}
PREFIX_ROWS["hf_vit_sharded"] = 1
NAMES = sorted(PREFIX_ROWS)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(2)]


def _side(name: str) -> Side:
    return read_side(FAM / name)


def _batch(runner: Any) -> torch.Tensor:
    return torch.stack([runner.preprocess(im) for im in _images()])


def _from_pretrained(cls: Any, folder: Path) -> Any:
    """transformers' own load of a local folder (its renamings included), every key fitting."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _oracle(name: str) -> Any:
    """The fixture's class (as the fixture maker names it), loaded from the fixture folder by transformers."""
    return _from_pretrained(getattr(transformers, make_families.HF_SPECS[name]["model"]), FAM / name)


def _oracle_outputs(name: str, model: Any, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(logits, pooled, hidden)`` as transformers gives them."""
    with torch.no_grad():
        if name == "hf_clip":
            feats = model.get_image_features(pixel_values=x)
            pooled = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
            return None, pooled, model.vision_model(pixel_values=x).last_hidden_state
        if name == "hf_siglip":
            out = model(pixel_values=x)
            return None, out.pooler_output, out.last_hidden_state
        base = getattr(model, model.base_model_prefix, model)
        hidden = base(pixel_values=x).last_hidden_state
        logits = model(pixel_values=x).logits if "Classification" in type(model).__name__ else None
        return logits, hidden[:, 0], hidden


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_matches_transformers(name: str) -> None:
    side = _side(name)
    runner = build(side)
    assert runner.load.ok, runner.load.describe()
    assert runner.architecture.library == "transformers" and runner.architecture.source == "config"
    assert runner.architecture.name == make_families.HF_SPECS[name]["model"]
    assert runner.input_size == side.img_size
    x = _batch(runner)
    assert x.shape == (2, 3, *side.img_size) and x.dtype == torch.float32
    out = runner.forward(x)
    logits, pooled, hidden = _oracle_outputs(name, _oracle(name), x)
    h, w = side.grid
    assert out.patches.shape == (2, h, w, hidden.shape[-1])
    _close(out.patches, hidden[:, PREFIX_ROWS[name] :].reshape(2, h, w, -1))
    _close(out.pooled, pooled)
    if logits is None:
        assert out.logits is None
    else:
        assert out.logits is not None and out.logits.shape == (2, 10)
        _close(out.logits, logits)


PROCESSORS = {
    "hf_vit": ("ViTImageProcessor", {"size": {"height": 32, "width": 32}}),
    "hf_dinov2": ("BitImageProcessor", {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}),
    "hf_clip": ("CLIPImageProcessor", {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}),
    "hf_siglip": ("SiglipImageProcessor", {"size": {"height": 32, "width": 32}}),
}


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_preprocess_is_the_model_types_processor(name: str) -> None:
    runner = build(_side(name))
    cls, kwargs = PROCESSORS[name]
    processor = getattr(transformers, cls)(**kwargs)
    for im in _images():
        want = processor(images=im, return_tensors="pt")["pixel_values"][0]
        _close(runner.preprocess(im), want)


def test_preprocessor_config_json_is_used(tmp_path: Path) -> None:
    folder = shutil.copytree(FAM / "hf_vit", tmp_path / "m")
    spec = {"image_processor_type": "CLIPImageProcessor", "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]}
    (folder / "preprocessor_config.json").write_text(json.dumps({**spec, "size": {"shortest_edge": 224}}))
    runner = build(read_side(folder))
    want = transformers.CLIPImageProcessor(
        image_mean=spec["image_mean"],
        image_std=spec["image_std"],
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
    )
    im = _images()[0]
    _close(runner.preprocess(im), want(images=im, return_tensors="pt")["pixel_values"][0])


@pytest.mark.parametrize("name", ["hf_vit", "hf_deit", "hf_dinov2_reg", "hf_clip", "hf_siglip"])
def test_converted_side_builds_at_the_new_size(name: str) -> None:
    side = _side(name)
    size = 64 if side.patch == (8, 8) else 56
    new = convert_side(side, Target(img_size=size), Options())
    runner = build(new)
    assert runner.load.ok, runner.load.describe()
    assert runner.input_size == (size, size)
    x = _batch(runner)
    assert x.shape == (2, 3, size, size)
    out = runner.forward(x)
    assert out.patches.shape[:3] == (2, 8, 8)


def test_converted_vit_matches_transformers_at_the_new_size(tmp_path: Path) -> None:
    new = convert_side(_side("hf_vit"), Target(img_size=64), Options())
    runner = build(new)
    make_families.hf_config("hf_vit", image_size=64).save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in new.state_dict.items()}, tmp_path / "model.safetensors")
    oracle = _from_pretrained(transformers.ViTForImageClassification, tmp_path)
    x = _batch(runner)
    out = runner.forward(x)
    logits, pooled, hidden = _oracle_outputs("hf_vit", oracle, x)
    assert logits is not None and out.logits is not None
    _close(out.logits, logits)
    _close(out.pooled, pooled)
    _close(out.patches, hidden[:, 1:].reshape(2, 8, 8, -1))


def test_wrong_shape_is_a_failed_load_not_an_error() -> None:
    side = _side("hf_vit")
    sd = dict(side.state_dict)
    sd["classifier.weight"] = torch.zeros(11, 16)
    runner = build(dataclasses.replace(side, state_dict=sd))
    assert not runner.load.ok
    assert any(m.startswith("classifier.weight:") for m in runner.load.mismatched)


def test_model_names_a_transformers_class() -> None:
    runner = build(_side("hf_vit"), model="ViTModel")
    assert runner.architecture.name == "ViTModel" and runner.architecture.source == "--model"
    assert runner.load.ok, runner.load.describe()  # the backbone's keys: the classifier is not the model's
    out = runner.forward(_batch(runner))
    assert out.logits is None and out.pooled.shape == (2, 16)
    with pytest.raises(UsageError) as e:
        build(_side("hf_vit"), model="NoSuchModel")
    assert "\n" not in str(e.value) and "--model" in e.value.cli_message()


@pytest.mark.parametrize("cls", ["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def test_model_builds_a_vision_tower_of_a_clip_checkpoint(cls: str) -> None:
    runner = build(_side("hf_clip"), model=cls)
    assert runner.load.ok, runner.load.describe()
    x = _batch(runner)
    out = runner.forward(x)
    oracle = _oracle("hf_clip")
    with torch.no_grad():
        vision = oracle.vision_model(pixel_values=x)
        want = vision.pooler_output
        if cls.endswith("WithProjection"):
            want = oracle.visual_projection(want)
    _close(out.pooled, want)
    _close(out.patches, vision.last_hidden_state[:, 1:].reshape(2, 4, 4, -1))


def test_vit_without_config_is_inferred() -> None:
    side = dataclasses.replace(_side("hf_vit"), config=None, config_kind=None)
    runner = build(side)
    arch = runner.architecture
    assert arch.name == "ViTForImageClassification" and arch.source == "inferred"
    assert arch.args["hidden_size"] == 16 and arch.args["num_labels"] == 10 and "guessed" in arch.note
    assert runner.load.ok, runner.load.describe()
    assert runner.forward(_batch(runner)).logits is not None
    runner = build(side, model="ViTModel")
    assert runner.architecture.source == "--model" and runner.load.ok


@pytest.mark.parametrize("name", ["hf_dinov2", "hf_deit", "hf_clip"])
def test_uninferrable_weights_raise_one_line(name: str) -> None:
    side = dataclasses.replace(_side(name), config=None, config_kind=None)
    with pytest.raises(GeometryError) as e:
        build(side)
    msg = e.value.cli_message()
    assert "\n" not in msg and "cannot tell the architecture" in msg and "--model" in msg


def test_unreadable_config_raises_one_line() -> None:
    side = _side("hf_vit")
    assert side.config is not None
    bad = dataclasses.replace(side, config={**side.config, "model_type": "no_such_type"})
    with pytest.raises(CheckpointFormatError) as e:
        build(bad)
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


def test_dinov2_without_config_builds_with_model() -> None:
    side = dataclasses.replace(_side("hf_dinov2_reg"), config=None, config_kind=None)
    runner = build(side, model="Dinov2WithRegistersModel")
    assert runner.load.ok, runner.load.describe()


# ---------------------------------------------------------------- model types without a committed fixture


def _save(model: Any, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


def test_beit_loads_through_transformers_renamings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.BeitConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        use_relative_position_bias=True,
        num_labels=10,
    )
    oracle = transformers.BeitForImageClassification(config).eval()
    runner = build(read_side(_save(oracle, tmp_path / "beit")))
    assert runner.load.ok, runner.load.describe()
    x = _batch(runner)
    out = runner.forward(x)
    with torch.no_grad():
        base = oracle.beit(pixel_values=x)
        logits = oracle(pixel_values=x).logits
    assert out.logits is not None
    _close(out.logits, logits)
    _close(out.pooled, base.pooler_output)
    _close(out.patches, base.last_hidden_state[:, 1:].reshape(2, 4, 4, -1))


def test_swin_patches_are_on_the_last_stage_grid(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.SwinConfig(
        embed_dim=16, depths=[1, 1], num_heads=[1, 2], image_size=32, patch_size=4, window_size=4, num_labels=10
    )
    oracle = transformers.SwinForImageClassification(config).eval()
    side = read_side(_save(oracle, tmp_path / "swin"))
    runner = build(side)
    assert runner.load.ok, runner.load.describe()
    x = _batch(runner)
    out = runner.forward(x)
    with torch.no_grad():
        base = oracle.swin(pixel_values=x)
        logits = oracle(pixel_values=x).logits
    assert out.logits is not None
    _close(out.logits, logits)
    _close(out.pooled, base.pooler_output)
    _close(out.patches, base.last_hidden_state.reshape(2, 4, 4, 32))
    with pytest.raises(GeometryError, match=r"config\.json"):
        build(dataclasses.replace(side, config=None, config_kind=None))
