"""timm LeViT and TinyViT: attention-bias tables ``attention_biases [heads, r*r]``.

LeViT's tables span each stage's resolution (image / 16, halved per stage, ceil), so a new image size resamples
them. timm's LeViT filter (``timm.models.levit.checkpoint_filter_fn``) resizes nothing; the oracle is timm's
LeViT-table convention, ``timm.layers.resize_rel_pos_bias_table_levit(v.T, new.shape[::-1]).T`` (bicubic,
antialias), as ``timm.models.tiny_vit.checkpoint_filter_fn`` applies it to every ``attention_biases`` key of
the model at the target; for a non-square target (which timm's function does not take) the same
``F.interpolate`` to ``(h, w)``. Every case loads ``strict=True`` into the model timm builds at the target.

TinyViT's tables span its attention windows, which do not depend on the image size: a new image size changes
nothing (the model has no ``img_size``), and the output is the input.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import resize_rel_pos_bias_table_levit
from timm.models import levit, tiny_vit
from typer.testing import CliRunner

import vitresize
from vitresize.cli import app
from vitresize.errors import VitresizeError
from vitresize.resample.attn_bias import resize_attn_bias

LEVIT = {"depth": (1, 1, 1), "embed_dim": (32, 48, 64), "num_heads": (2, 3, 4), "key_dim": 8}
TINYVIT = {"embed_dims": (16, 32, 48, 64), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 3, 4)}


def _model(name: str, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():  # random tables, not timm's zero init, so that resampling shows
        for k, p in model.named_parameters():
            if "attention_biases" in k:
                p.normal_()
    return model.eval()


def _state(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in sd.items()}


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(sd, str(path))
    return path


def _levit_oracle(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's LeViT filter, then every table resized to the target model's as timm's TinyViT filter resizes
    them (``resize_rel_pos_bias_table_levit``); a non-square table with the same interpolation to its ``(h, w)``."""
    out = levit.checkpoint_filter_fn(dict(sd), model)
    target = model.state_dict()
    square = {k: v for k, v in out.items() if "attention_biases" not in k or _square(target[k].shape[1])}
    square = tiny_vit.checkpoint_filter_fn(square, model)
    for k, v in out.items():
        if k not in square:
            mod = model.get_submodule(k.rsplit(".", 1)[0])
            side = int(v.shape[1] ** 0.5)  # the sources are square in these tests
            old = (side, side)
            new = tuple(mod.resolution)
            img = v.float().reshape(1, v.shape[0], *old)
            r = F.interpolate(img, size=new, mode="bicubic", align_corners=False, antialias=True)
            square[k] = r.reshape(v.shape[0], -1).to(v.dtype)
    return square


def _square(n: int) -> bool:
    return int(n**0.5) ** 2 == n


def _assert_close(out: dict[str, torch.Tensor], want: dict[str, torch.Tensor], src: dict[str, torch.Tensor]) -> None:
    assert set(out) == set(want)
    for k, v in want.items():
        assert out[k].shape == v.shape, k
        assert out[k].dtype == v.dtype, k
        if out[k].shape == src[k].shape:  # unchanged tensors are bit-identical
            assert torch.equal(out[k], src[k]), k
        elif v.is_floating_point():
            assert torch.equal(out[k], v), k  # the same kernel on the same float32 input
        else:
            assert torch.equal(out[k], v), k


LEVIT_CASES = [
    # (model, timm target kwargs, vitresize target, tables that change)
    pytest.param("levit_128s", {"img_size": 384}, {"img_size": 384}, 5, id="levit-384"),
    pytest.param("levit_128s", {"img_size": 160}, {"img_size": 160}, 5, id="levit-smaller"),
    pytest.param("levit_128s", {"img_size": 256}, {"img_size": 256}, 4, id="levit-256-last-stage-same"),
    pytest.param("levit_128s", {"img_size": (224, 320)}, {"img_size": "224x320"}, 5, id="levit-nonsquare"),
    pytest.param("levit_128s", {"img_size": (192, 256)}, {"grid": "12x16"}, 5, id="levit-grid"),
    pytest.param("levit_conv_128s", {"img_size": 384}, {"img_size": 384}, 5, id="levit-conv-384"),
    pytest.param("levit_384_s8", {"img_size": 160}, {"img_size": 160}, 5, id="levit-s8-stem"),
]


@pytest.mark.parametrize(("name", "dst_kw", "target", "changed"), LEVIT_CASES)
def test_levit_converts_as_timm(
    tmp_path: Path, name: str, dst_kw: dict[str, Any], target: dict[str, Any], changed: int
) -> None:
    src_model = _model(name, **LEVIT)
    sd = _state(src_model)
    src = _save(sd, tmp_path / "in.safetensors")
    rep = vitresize.convert(src, tmp_path / "out.safetensors", from_img_size=224, **target)
    assert {c.op for c in rep.plan.changes} == {"attn_bias"}
    assert len(rep.plan.changes) == changed
    out = load_file(str(tmp_path / "out.safetensors"))
    dst_model = _model(name, **LEVIT, **dst_kw)
    dst_model.load_state_dict(out, strict=True)
    _assert_close(out, _levit_oracle(sd, dst_model), sd)
    size = dst_kw["img_size"]
    if not isinstance(size, int):  # a non-square target runs (timm's own resize takes square tables only)
        with torch.no_grad():
            dst_model(torch.randn(1, 3, *size))


def test_levit_in_a_training_checkpoint(tmp_path: Path) -> None:
    """A ``{"model": ...}`` container under a ``module.`` prefix (DDP): converted where it is, as timm's filter
    unwraps ``model``; the tables' resolutions are read below the prefix."""
    sd = _state(_model("levit_128s", **LEVIT))
    src = tmp_path / "in.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, src)
    vitresize.convert(src, tmp_path / "out.pth", img_size=384, from_img_size=224)
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert out["epoch"] == 3
    got = {k.removeprefix("module."): v for k, v in out["model"].items()}
    dst = _model("levit_128s", **LEVIT, img_size=384)
    dst.load_state_dict(got, strict=True)
    _assert_close(got, _levit_oracle(sd, dst), sd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_levit_dtypes_as_timm(tmp_path: Path, dtype: torch.dtype) -> None:
    """timm computes in float32 (``.float()``, a float64 table too) and casts back: bit for bit here."""
    sd = _state(_model("levit_128s", **LEVIT), dtype)
    src = _save(sd, tmp_path / "in.safetensors")
    vitresize.convert(src, tmp_path / "out.safetensors", img_size=384, from_img_size=224)
    out = load_file(str(tmp_path / "out.safetensors"))
    want = tiny_vit.checkpoint_filter_fn(dict(sd), _model("levit_128s", **LEVIT, img_size=384))
    for k, v in want.items():
        if "attention_biases" in k:
            assert out[k].dtype == dtype, k
            assert torch.equal(out[k], v.to(dtype)), k
        else:
            assert torch.equal(out[k], sd[k]), k


@pytest.mark.parametrize(("old", "new"), [(14, 24), (14, 10), (7, 12), (4, 6), (16, 7), (3, 3)])
def test_resize_attn_bias_is_timms_function(old: int, new: int) -> None:
    torch.manual_seed(0)
    table = torch.randn(5, old * old)
    want = resize_rel_pos_bias_table_levit(table.T, (new * new, 5)).T
    assert torch.equal(resize_attn_bias(table, old=(old, old), new=(new, new)), want)


def test_levit_same_size_changes_nothing(tmp_path: Path) -> None:
    src = _save(_state(_model("levit_128s", **LEVIT)), tmp_path / "in.safetensors")
    res = CliRunner().invoke(
        app,
        ["convert", str(src), str(tmp_path / "out.safetensors"), "--img-size", "224", "--from-img-size", "224"],
    )
    assert res.exit_code == 0, res.output
    with vitresize.plan(src, img_size=224, from_img_size=224) as p:
        assert p.changes == ()
        assert any("nothing to resample" in w for w in p.warnings)


def test_levit_cli_json_and_inspect(tmp_path: Path) -> None:
    src = _save(_state(_model("levit_128s", **LEVIT)), tmp_path / "in.safetensors")
    res = CliRunner().invoke(
        app,
        [
            "convert",
            str(src),
            str(tmp_path / "out.safetensors"),
            "--img-size",
            "384",
            "--from-img-size",
            "224",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["family"] == "timm-levit"
    assert doc["scheme"] == "relative"
    assert doc["new_grid"] == [24, 24]
    assert {c["op"] for c in doc["changes"]} == {"attn_bias"}
    ins = vitresize.inspect(src)
    e = ins.embeddings[0]
    assert (e.family, e.scheme, e.patch_key) == ("timm-levit", "relative", "stem.conv1.linear.weight")
    assert e.source is not None and e.source.patch == (16, 16)
    assert "attention-bias tables" in e.scheme_text


def test_levit_source_grid_is_read_from_its_tables(tmp_path: Path) -> None:
    src = _save(_state(_model("levit_128s", **LEVIT)), tmp_path / "in.safetensors")
    with vitresize.plan(src, img_size=384) as p:
        assert p.models[0].source.grid == (14, 14)
        assert len(p.changes) == 5


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ({"patch": 8, "from_img_size": 224}, "stride-2 convolutions"),
        ({"img_size": 248, "from_img_size": 224}, "not divisible by the patch size"),
        ({"img_size": 384, "from_img_size": 256}, "span"),
    ],
    ids=["patch", "not-a-multiple-of-16", "wrong-source-size"],
)
def test_levit_refusals(tmp_path: Path, target: dict[str, Any], match: str) -> None:
    src = _save(_state(_model("levit_128s", **LEVIT)), tmp_path / "in.safetensors")
    with pytest.raises(VitresizeError, match=match):
        vitresize.plan(src, **target)


def test_levit_saved_index_buffers_are_refused(tmp_path: Path) -> None:
    """Older checkpoints saved attention_bias_idxs (timm rebuilds it and its filter drops it): refused, with what
    to do, rather than written for the old resolution."""
    model = _model("levit_128s", **LEVIT)
    sd = _state(model)
    for name, buf in model.named_buffers():
        if name.endswith("attention_bias_idxs"):
            sd[name] = buf.contiguous()
    src = _save(sd, tmp_path / "in.safetensors")
    with pytest.raises(VitresizeError, match="attention_bias_idxs is an index buffer saved with the weights"):
        vitresize.plan(src, img_size=384, from_img_size=224)


def test_levit_window_is_refused(tmp_path: Path) -> None:
    src = _save(_state(_model("levit_128s", **LEVIT)), tmp_path / "in.safetensors")
    with pytest.raises(VitresizeError, match="has no window to change"):
        vitresize.plan(src, window=12)


def test_tinyvit_new_image_size_changes_nothing(tmp_path: Path) -> None:
    """TinyViT has no img_size; its tables span window_sizes, padded over any input: timm's own filter into the
    model (which is the same at every input size) leaves them as they are, and so does vitresize."""
    model = _model("tiny_vit_5m_224", **TINYVIT)
    sd = _state(model)
    for name, buf in model.named_buffers():  # original (Cream) checkpoints save the index: passed through
        if name.endswith("attention_bias_idxs"):
            sd[name] = buf.contiguous()
    src = _save(sd, tmp_path / "in.safetensors")
    res = CliRunner().invoke(
        app, ["convert", str(src), str(tmp_path / "out.safetensors"), "--img-size", "384", "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["family"] == "timm-tinyvit"
    assert doc["changes"] == []
    assert doc["scheme"] == "relative"
    assert any("nothing to resample" in w and "window" in w for w in doc["warnings"])
    out = load_file(str(tmp_path / "out.safetensors"))
    assert set(out) == set(sd) and all(torch.equal(out[k], v) for k, v in sd.items())
    dst = _model("tiny_vit_5m_224", **TINYVIT)
    want = tiny_vit.checkpoint_filter_fn(dict(out), dst)
    dst.load_state_dict(want, strict=True)
    assert all(torch.equal(want[k], out[k]) for k in want)
    with torch.no_grad():
        dst(torch.randn(1, 3, 384, 384))  # it runs at 384 with the same tables
    e = vitresize.inspect(src).embeddings[0]
    assert (e.family, e.scheme, e.patch_key) == ("timm-tinyvit", "relative", "patch_embed.conv1.conv.weight")
    assert e.source is not None and e.source.patch == (4, 4)


@pytest.mark.parametrize(
    ("target", "match"),
    [({"window": "6x8"}, "takes one window size"), ({"patch": 8}, "two stride-2 convolutions")],
    ids=["window", "patch"],
)
def test_tinyvit_refusals(tmp_path: Path, target: dict[str, Any], match: str) -> None:
    src = _save(_state(_model("tiny_vit_5m_224", **TINYVIT)), tmp_path / "in.safetensors")
    with pytest.raises(VitresizeError, match=match):
        vitresize.plan(src, **target)


def test_efficientvit_msra_is_not_tinyvit(tmp_path: Path) -> None:
    """EfficientViT-MSRA starts with the same conv key as TinyViT (a stride-16 stem, windowed biases under
    ``mixer.m.attn``): it is not taken for a TinyViT."""
    model = _model("efficientvit_m0", embed_dim=(16, 32, 48), depth=(1, 1, 1), num_heads=(2, 2, 2))
    src = _save(_state(model), tmp_path / "in.safetensors")
    with pytest.raises(VitresizeError, match="no ViT of family 'timm-tinyvit'"):
        vitresize.plan(src, img_size=384, family="timm-tinyvit").close()


def test_tinyvit_window_scales_every_stage(tmp_path: Path) -> None:
    """``--window 12`` on window_sizes (7, 7, 14, 7) is timm's (12, 12, 24, 12) (its 384 models): each stage's
    biases resampled as timm's filter does (``resize_rel_pos_bias_table_levit``), strict load at the target."""
    model = _model("tiny_vit_5m_224", **TINYVIT)
    src = _save(_state(model), tmp_path / "in.safetensors")
    rep = vitresize.convert(src, tmp_path / "out.safetensors", window=12)
    assert {c.spans for c in rep.plan.changes} >= {((7, 7), (12, 12)), ((14, 14), (24, 24))}
    out = load_file(str(tmp_path / "out.safetensors"))
    dst = _model("tiny_vit_5m_224", **TINYVIT, window_sizes=(12, 12, 24, 12))
    dst.load_state_dict(out, strict=True)
    want = tiny_vit.checkpoint_filter_fn(dict(model.state_dict()), dst)
    for k, v in want.items():
        assert torch.equal(out[k], v), k
