"""The open_clip and torchvision runners of ``check``: strict loads, output shapes, and outputs equal to the
libraries' own models (built as the fixture makers build them) on the same weights and images."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from make_families import open_clip_model  # fixtures/ is on sys.path (conftest)
from make_fixtures import SPECS, TV_TINY, build_model
from PIL import Image

from vitresize.errors import GeometryError, UsageError
from vitresize.fidelity import lib_open_clip, lib_torchvision
from vitresize.fidelity.base import Runner, Side
from vitresize.fidelity.sides import convert_side, read_side
from vitresize.options import Options, Target

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

OC = FIXTURES / "families" / "open_clip.pth"
TV = FIXTURES / "torchvision_vit.pth"
ATOL = 1e-5


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 50), (37, 29))]


@pytest.fixture(scope="module")
def oc_side() -> Side:
    return read_side(OC)


@pytest.fixture(scope="module")
def tv_side() -> Side:
    return read_side(TV)


def _batch(runner: Runner, images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([runner.preprocess(im) for im in images])


def _with(side: Side, **tensors: Any) -> Side:
    """``side`` with tensors replaced (a value of ``None`` drops the key, a str key prefix drops all under it)."""
    sd = dict(side.state_dict)
    for key, value in tensors.items():
        if value is None:
            sd = {k: v for k, v in sd.items() if not k.startswith(key)}
        else:
            sd[key] = value
    return dataclasses.replace(side, state_dict=sd)


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(e.value)
    assert "\n" not in text and text
    return text


# ---------------------------------------------------------------- open_clip


def _oc_oracle(side: Side, head_width: int) -> torch.nn.Module:
    """open_clip's whole CLIP (as make_families builds it) at the side's geometry, loaded with its state dict."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    size = side.img_size if side.img_size[0] != side.img_size[1] else side.img_size[0]
    vision = CLIPVisionCfg(layers=1, width=16, head_width=head_width, image_size=size, patch_size=side.patch[0])
    text = CLIPTextCfg(context_length=16, vocab_size=64, width=16, heads=2, layers=1)
    model = CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text).eval()
    model.load_state_dict(side.state_dict, strict=True)
    return model


def _assert_oc_matches(runner: Runner, oracle: torch.nn.Module, x: torch.Tensor) -> None:
    out = runner.forward(x)
    with torch.inference_mode():
        embed = oracle.encode_image(x)
        inter = oracle.visual.forward_intermediates(x, indices=1, normalize_intermediates=True, output_fmt="NCHW")
    torch.testing.assert_close(out.pooled, embed, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooled, inter["image_features"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.patches, inter["image_intermediates"][-1].permute(0, 2, 3, 1), atol=ATOL, rtol=0)


def test_oc_inferred_loads_and_matches_open_clip(oc_side: Side, images: list[Image.Image]) -> None:
    runner = lib_open_clip.build(oc_side)
    assert runner.load.ok, runner.load.describe()
    arch = runner.architecture
    assert (arch.library, arch.source) == ("open_clip", "inferred")
    assert arch.args["width"] == 16 and arch.args["layers"] == 1 and arch.args["embed_dim"] == 8
    assert "head(s) guessed" in arch.note and "QuickGELU" in arch.note
    x = _batch(runner, images)
    assert x.shape == (2, 3, 32, 32) and runner.input_size == (32, 32)
    out = runner.forward(x)
    assert out.logits is None and out.pooled.shape == (2, 8) and out.patches.shape == (2, 4, 4, 16)
    assert out.pooled.dtype == out.patches.dtype == torch.float32
    _assert_oc_matches(runner, _oc_oracle(oc_side, head_width=16), x)  # one head, as inferred for width 16


def _local_dir(tmp_path: Path, preprocess: dict[str, Any] | None = None, **vision: Any) -> str:
    cfg: dict[str, Any] = {
        "model_cfg": {
            "embed_dim": 8,
            "vision_cfg": {"layers": 1, "width": 16, "head_width": 8, "image_size": 32, "patch_size": 8, **vision},
            "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
        }
    }
    if preprocess is not None:
        cfg["preprocess_cfg"] = preprocess
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    return f"local-dir:{tmp_path}"


def test_oc_model_names_the_fixture_makers_model(oc_side: Side, images: list[Image.Image], tmp_path: Path) -> None:
    import open_clip

    name = _local_dir(tmp_path)
    runner = lib_open_clip.build(oc_side, model=name)
    assert runner.load.ok and runner.architecture.source == "--model" and runner.architecture.name == name
    assert runner.architecture.args["head_width"] == 8
    x = _batch(runner, images)
    oracle = open_clip_model()  # two heads, as the fixture was made
    oracle.load_state_dict(torch.load(OC, weights_only=True))
    _assert_oc_matches(runner, oracle, x)
    # the eval transform open_clip itself gives for that model
    _, _, preprocess = open_clip.create_model_and_transforms(name)
    for im in images:
        torch.testing.assert_close(runner.preprocess(im), preprocess(im), atol=0, rtol=0)


def test_oc_preprocess_is_open_clips_eval_transform(oc_side: Side, images: list[Image.Image], tmp_path: Path) -> None:
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, image_transform

    runner = lib_open_clip.build(oc_side)
    ref = image_transform((32, 32), is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    for im in images:
        torch.testing.assert_close(runner.preprocess(im), ref(im), atol=0, rtol=0)
    # a local-dir config's preprocess_cfg is used, as open_clip does
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "squash"}
    runner = lib_open_clip.build(oc_side, model=_local_dir(tmp_path, pp))
    ref = image_transform((32, 32), is_train=False, **pp)
    torch.testing.assert_close(runner.preprocess(images[0]), ref(images[0]), atol=0, rtol=0)


def test_oc_attentional_pooler_gives_the_last_blocks_tokens(
    oc_side: Side, images: list[Image.Image], tmp_path: Path
) -> None:
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    vision = {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}
    torch.manual_seed(0)
    cfg = CLIPVisionCfg(layers=1, width=16, head_width=8, image_size=32, patch_size=8, output_tokens=True, **vision)
    tower = _build_vision_tower(8, cfg).eval()
    side = dataclasses.replace(oc_side, state_dict={"visual." + k: v for k, v in tower.state_dict().items()})
    runner = lib_open_clip.build(side, model=_local_dir(tmp_path, **vision))
    assert runner.load.ok, runner.load.describe()
    x = _batch(runner, images)
    out = runner.forward(x)
    with torch.inference_mode():
        pooled, _ = tower(x)
        last = tower.forward_intermediates(x, indices=1, output_fmt="NLC")["image_intermediates"][-1]
    torch.testing.assert_close(out.pooled, pooled, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.patches, last.reshape(2, 4, 4, 16), atol=ATOL, rtol=0)


def test_oc_builtin_name(oc_side: Side) -> None:
    runner = lib_open_clip.build(oc_side, model="ViT-S-32")  # width 384: the tiny weights do not fit
    assert not runner.load.ok
    assert any(m.startswith("class_embedding:") for m in runner.load.mismatched)
    assert runner.architecture.args["width"] == 384


@pytest.mark.parametrize("size", [64, (32, 48)])
def test_oc_converted_side(oc_side: Side, images: list[Image.Image], size: int | tuple[int, int]) -> None:
    side = convert_side(oc_side, Target(img_size=size), Options())
    h, w = side.img_size
    runner = lib_open_clip.build(side)
    assert runner.load.ok, runner.load.describe()
    assert runner.input_size == (h, w)
    x = _batch(runner, images)
    assert x.shape == (2, 3, h, w)
    out = runner.forward(x)
    assert out.patches.shape == (2, h // 8, w // 8, 16)
    _assert_oc_matches(runner, _oc_oracle(side, head_width=16), x)


def test_oc_wrong_shape_is_a_failed_load(oc_side: Side) -> None:
    key = "transformer.resblocks.0.attn.out_proj.weight"
    runner = lib_open_clip.build(_with(oc_side, **{"visual." + key: torch.zeros(16, 15)}))
    assert not runner.load.ok
    assert runner.load.mismatched and runner.load.mismatched[0].startswith(key + ":")


@pytest.mark.parametrize(
    "change",
    [{"visual.transformer.resblocks.": None}, {"visual.attn_pool.query": torch.zeros(4, 8)}, {"visual.proj": None}],
)
def test_oc_uninferrable_raises_one_line(oc_side: Side, change: dict[str, Any]) -> None:
    with pytest.raises(GeometryError) as e:
        lib_open_clip.build(_with(oc_side, **change))
    assert "cannot tell the architecture" in _one_line(e) and "--model" in e.value.cli_message()  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["no-such-model", "ViT-B-16-SigLIP", "hf-hub:timm/ViT-B-16-SigLIP", "local-dir:/nope"])
def test_oc_bad_model_name(oc_side: Side, name: str) -> None:
    with pytest.raises(UsageError) as e:
        lib_open_clip.build(oc_side, model=name)
    assert name in _one_line(e)


# ---------------------------------------------------------------- torchvision


def _tv_oracle(side: Side, num_heads: int) -> torch.nn.Module:
    """torchvision's VisionTransformer as make_fixtures builds it, at the side's size, loaded with its weights."""
    size, patch = side.img_size[0], side.patch[0]
    model = build_model(SPECS["torchvision_vit.pth"], image_size=size, patch_size=patch, num_heads=num_heads).eval()
    model.load_state_dict(side.state_dict, strict=True)
    return model


def _assert_tv_matches(runner: Runner, oracle: Any, x: torch.Tensor) -> None:
    out = runner.forward(x)
    with torch.inference_mode():
        logits = oracle(x)
        tokens = oracle._process_input(x)
        tokens = oracle.encoder(torch.cat([oracle.class_token.expand(x.shape[0], -1, -1), tokens], dim=1))
    h, w = runner.grid  # type: ignore[attr-defined]
    assert out.logits is not None
    torch.testing.assert_close(out.logits, logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooled, tokens[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.patches, tokens[:, 1:].reshape(x.shape[0], h, w, -1), atol=ATOL, rtol=0)


def test_tv_inferred_loads_and_matches_torchvision(tv_side: Side, images: list[Image.Image]) -> None:
    runner = lib_torchvision.build(tv_side)
    assert runner.load.ok, runner.load.describe()
    arch = runner.architecture
    assert (arch.library, arch.name, arch.source) == ("torchvision", "VisionTransformer", "inferred")
    assert {k: arch.args[k] for k in ("num_layers", "hidden_dim", "mlp_dim", "num_classes")} == {
        k: TV_TINY[k] for k in ("num_layers", "hidden_dim", "mlp_dim", "num_classes")
    }
    assert "head(s) guessed" in arch.note
    x = _batch(runner, images)
    assert x.shape == (2, 3, 32, 32)
    out = runner.forward(x)
    assert out.logits is not None and out.logits.shape == (2, 10)
    assert out.pooled.shape == (2, 16) and out.patches.shape == (2, 4, 4, 16)
    _assert_tv_matches(runner, _tv_oracle(tv_side, num_heads=1), x)  # one head, as inferred for width 16


def _tiny_builder(patch: int) -> Any:
    from torchvision.models.vision_transformer import VisionTransformer

    def vit_tiny_test(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> Any:
        return VisionTransformer(**{**TV_TINY, "patch_size": patch, **kwargs})

    return vit_tiny_test


def test_tv_model_names_a_builder(tv_side: Side, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import _api

    monkeypatch.setitem(_api.BUILTIN_MODELS, "vit_tiny_test", _tiny_builder(8))
    runner = lib_torchvision.build(tv_side, model="vit_tiny_test")
    assert runner.load.ok and runner.architecture.source == "--model" and runner.architecture.note == ""
    assert runner.architecture.args["num_heads"] == 2
    x = _batch(runner, images)
    _assert_tv_matches(runner, _tv_oracle(tv_side, num_heads=2), x)  # two heads, as the fixture was made
    monkeypatch.setitem(_api.BUILTIN_MODELS, "vit_tiny_test", _tiny_builder(16))  # its widths, the side's patch
    runner = lib_torchvision.build(tv_side, model="vit_tiny_test")
    assert runner.load.ok and "patch 8" in runner.architecture.note


def test_tv_torchvision_builder_widths(tv_side: Side) -> None:
    arch = lib_torchvision._named("vit_b_16", tv_side, lib_torchvision.strip_prefix(tv_side.state_dict, ""))
    assert arch.args == {"num_layers": 12, "num_heads": 12, "hidden_dim": 768, "mlp_dim": 3072, "num_classes": 10}
    assert "patch 8" in arch.note
    with pytest.raises(UsageError) as e:
        lib_torchvision.build(tv_side, model="no_such_vit")
    assert "no_such_vit" in _one_line(e)


def test_tv_preprocess_is_torchvisions_eval_preset(tv_side: Side, images: list[Image.Image]) -> None:
    from torchvision.models import ViT_B_16_Weights
    from torchvision.transforms._presets import ImageClassification

    runner = lib_torchvision.build(tv_side)
    ref = ImageClassification(crop_size=32, resize_size=37)
    for im in images:
        torch.testing.assert_close(runner.preprocess(im), ref(im), atol=0, rtol=0)
    side = convert_side(tv_side, Target(img_size=224), Options())  # as vit_b_16's weights do at 224
    runner = lib_torchvision.build(side)
    assert runner.load.ok
    ref = ViT_B_16_Weights.IMAGENET1K_V1.transforms()
    torch.testing.assert_close(runner.preprocess(images[0]), ref(images[0]), atol=0, rtol=0)


def test_tv_converted_side(tv_side: Side, images: list[Image.Image]) -> None:
    side = convert_side(tv_side, Target(img_size=64), Options())
    runner = lib_torchvision.build(side)
    assert runner.load.ok, runner.load.describe()
    x = _batch(runner, images)
    assert x.shape == (2, 3, 64, 64)
    assert runner.forward(x).patches.shape == (2, 8, 8, 16)
    _assert_tv_matches(runner, _tv_oracle(side, num_heads=1), x)


def test_tv_without_head(tv_side: Side, images: list[Image.Image]) -> None:
    runner = lib_torchvision.build(_with(tv_side, **{"heads.": None}))
    assert runner.load.ok
    out = runner.forward(_batch(runner, images))
    assert out.logits is None and out.pooled.shape == (2, 16)


def test_tv_wrong_shape_is_a_failed_load(tv_side: Side) -> None:
    key = "encoder.layers.encoder_layer_0.self_attention.out_proj.weight"
    runner = lib_torchvision.build(_with(tv_side, **{key: torch.zeros(16, 15)}))
    assert not runner.load.ok
    assert runner.load.mismatched and runner.load.mismatched[0].startswith(key + ":")


def test_tv_uninferrable_raises_one_line(tv_side: Side) -> None:
    with pytest.raises(GeometryError) as e:
        lib_torchvision.build(_with(tv_side, **{"encoder.layers.": None}))
    assert "cannot tell the architecture" in _one_line(e) and "--model" in e.value.cli_message()  # type: ignore[attr-defined]


def test_tv_non_square_raises_one_line(tv_side: Side) -> None:
    side = dataclasses.replace(tv_side, img_size=(32, 48), grid=(4, 6))
    with pytest.raises(GeometryError) as e:
        lib_torchvision.build(side)
    assert "square image size" in _one_line(e)
