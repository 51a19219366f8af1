"""timm GCViT and MaxxViT (MaxViT, CoAtNet): relative bias tables over windows derived from the image size.

Each case builds a tiny model at random init (random tables: timm inits them to zero), converts it with
vitresize, loads the output strictly into the model timm builds at the target, and compares every tensor with
what timm makes of the source: ``timm.models.maxxvit.checkpoint_filter_fn(sd, model_at_target)`` (which
resizes each table with ``resize_rel_pos_bias_table``; GCViT has no filter of its own, and maxxvit's runs the
same code on it). A non-square source is checked against ``MaxxVit.set_input_size`` and GCViT's
``RelPosBias.set_window_size``, which pass the old window (the filter infers it from the rows, square only).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from conftest import assert_tensors_close
from safetensors.torch import load_file, save_file
from timm.models import maxxvit
from timm.models.gcvit import GlobalContextVit
from typer.testing import CliRunner

import vitresize
from vitresize.cli import app
from vitresize.errors import VitresizeError

Size = int | tuple[int, int]
Builder = Callable[..., torch.nn.Module]

MAXX: dict[str, Any] = {
    "embed_dim": (8, 8, 8, 8),
    "depths": (1, 1, 1, 1),
    "stem_width": 8,
    "head_hidden_size": None,
    "num_classes": 4,
    "transformer_dim_head": 8,  # one head per table: timm's resampler loops over heads
    "conv_attn_ratio": 0.5,
}
GC_RATIOS = (32, 32, 16, 32)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "relative_position_bias_table" in k:
                p.normal_()
    return model.eval()


def _gcvit(img: Size = 224, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    small: dict[str, Any] = {
        "embed_dim": 16,
        "depths": (1, 1, 1, 1),
        "num_heads": (1, 1, 1, 1),
        "mlp_ratio": 1.0,
        "num_classes": 4,
    }
    return _randomize(GlobalContextVit(img_size=img, **small, **kwargs))


def _maxx(name: str, **fixed: Any) -> Builder:
    def build(img: Size | None = None, **kwargs: Any) -> torch.nn.Module:
        torch.manual_seed(0)
        size: dict[str, Any] = {} if img is None else {"img_size": img}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False, **{**MAXX, **fixed}, **size, **kwargs)
        return _randomize(model)

    return build


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _assert_close(out: dict[str, torch.Tensor], want: dict[str, torch.Tensor], src: dict[str, torch.Tensor]) -> None:
    """Every tensor as ``want``; the ones that keep their shape bit for bit the source's."""
    assert_tensors_close(out, want)
    for k in want:
        if "relative_position_bias_table" not in k or out[k].shape == src[k].shape:
            assert torch.equal(out[k], src[k]), k


def _convert_and_check(tmp_path: Path, build: Builder, src_img: Size | None, dst_img: Size, changed: int) -> None:
    src_model = build(src_img) if src_img is not None else build()
    src = _save(src_model, tmp_path / "in.safetensors")
    rep = vitresize.convert(src, tmp_path / "out.safetensors", img_size=dst_img)
    assert len(rep.plan.changes) == changed
    assert {c.op for c in rep.plan.changes} <= {"rel_bias"}
    out = load_file(str(tmp_path / "out.safetensors"))
    dst_model = build(dst_img)
    dst_model.load_state_dict(out, strict=True)
    sd = {k: v.contiguous() for k, v in src_model.state_dict().items()}
    _assert_close(out, maxxvit.checkpoint_filter_fn(dict(sd), dst_model), sd)


@pytest.mark.parametrize("img", [448, 384, 160, (224, 320)])
def test_gcvit(tmp_path: Path, img: Size) -> None:
    """Stage windows image // (32, 32, 16, 32): 7, 7, 14, 7 at 224 -> 14, 14, 28, 14 at 448, (7, 10)... at 224x320."""
    _convert_and_check(tmp_path, _gcvit, None, img, 4)


@pytest.mark.parametrize("img", [384, 160, (224, 320)])
def test_maxvit_tf(tmp_path: Path, img: Size) -> None:
    """``bias_tf`` tables ``[heads, 2w-1, 2w-1]`` (HLL) of block and grid attention, w = image // 32."""
    _convert_and_check(tmp_path, _maxx("maxvit_tiny_tf_224"), None, img, 8)


@pytest.mark.parametrize("img", [384, (256, 320), 224])
def test_maxvit_rw(tmp_path: Path, img: Size) -> None:
    """``bias`` tables ``[(2w-1)^2, heads]`` (LH, two heads here): 225 rows at 256."""
    _convert_and_check(tmp_path, _maxx("maxvit_pico_rw_256", transformer_dim_head=4), None, img, 8)


@pytest.mark.parametrize(("name", "changed"), [("maxvit_tiny_pm_256", 8), ("maxxvitv2_nano_rw_256", 4)])
def test_maxvit_parallel_and_v2(tmp_path: Path, name: str, changed: int) -> None:
    """The parallel blocks' keys (``attn.attn_block``) and MaxxViT-V2's grid attention alone."""
    _convert_and_check(tmp_path, _maxx(name), None, 384, changed)


@pytest.mark.parametrize("img", [448, (224, 288), 160])
def test_coatnet(tmp_path: Path, img: Size) -> None:
    """CoAtNet's transformer stages attend over their whole feature map: 14 and 7 at 224 (729 and 169 rows)."""
    _convert_and_check(tmp_path, _maxx("coatnet_0_rw_224"), None, img, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(tmp_path: Path, dtype: torch.dtype) -> None:
    """Tables kept in their dtype, resampled as timm does (in float32, cast back)."""
    build = _maxx("maxvit_tiny_tf_224")
    model = build().to(dtype)
    src = _save(model, tmp_path / "in.safetensors")
    vitresize.convert(src, tmp_path / "out.safetensors", img_size=384)
    out = load_file(str(tmp_path / "out.safetensors"))
    dst_model = build(384).to(dtype)
    dst_model.load_state_dict(out, strict=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    _assert_close(out, maxxvit.checkpoint_filter_fn(dict(sd), dst_model), sd)


@pytest.mark.parametrize(("name", "img"), [("maxvit_rmlp_pico_rw_256", 384), ("coatnet_rmlp_nano_rw_224", 448)])
def test_rmlp_changes_nothing(tmp_path: Path, name: str, img: int) -> None:
    """An MLP bias (``rel_pos.mlp``) is evaluated at run time for any window: the tensors are copied, exit 0."""
    build = _maxx(name)
    src = _save(build(), tmp_path / "in.safetensors")
    res = CliRunner().invoke(
        app, ["convert", str(src), str(tmp_path / "out.safetensors"), "--img-size", str(img), "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["changes"] == []
    assert any("nothing to resample" in w and "rel_pos.mlp" in w for w in doc["warnings"])
    assert vitresize.inspect(src).embeddings[0].family == "timm-maxxvit-rmlp"
    out = load_file(str(tmp_path / "out.safetensors"))
    build(img).load_state_dict(out, strict=True)
    ref = load_file(str(src))
    assert all(torch.equal(out[k], v) for k, v in ref.items())


def test_cli_json_and_inspect(tmp_path: Path) -> None:
    src = _save(_gcvit(), tmp_path / "in.safetensors")
    ins = vitresize.inspect(src)
    e = ins.embeddings[0]
    assert (e.family, e.scheme, e.source.grid if e.source else None) == ("timm-gcvit", "relative", (7, 7))
    assert e.img_size == (224, 224)
    assert "32, 32, 16, 32" in e.scheme_text
    res = CliRunner().invoke(
        app, ["convert", str(src), str(tmp_path / "out.safetensors"), "--img-size", "448", "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert len(doc["changes"]) == 4
    assert vitresize.inspect(_save(_maxx("maxvit_tiny_tf_224")(), tmp_path / "m.safetensors")).embeddings[0].family == (
        "timm-maxxvit"
    )


@pytest.mark.parametrize("name", ["maxvit_pico_rw_256", "maxvit_tiny_tf_224"])
def test_non_square_source_maxvit(tmp_path: Path, name: str) -> None:
    """A non-square table does not tell its window (refused), from_img_size does; the oracle is
    ``set_input_size``, which resizes each table from its own window (LH and HLL)."""
    build = _maxx(name, transformer_dim_head=4)
    model: Any = build((256, 320))
    src = _save(model, tmp_path / "in.safetensors")
    with pytest.raises(VitresizeError, match="cannot infer the source grid"):
        vitresize.plan(src, img_size=384)
    vitresize.convert(src, tmp_path / "out.safetensors", img_size=384, from_img_size=(256, 320))
    out = load_file(str(tmp_path / "out.safetensors"))
    build(384).load_state_dict(out, strict=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    model.set_input_size(img_size=(384, 384))
    _assert_close(out, {k: v.contiguous() for k, v in model.state_dict().items()}, sd)


def test_non_square_source_gcvit(tmp_path: Path) -> None:
    """GCViT at 224x320 (windows 7x10, 7x10, 14x20, 7x10) -> 448: ``RelPosBias.set_window_size`` per block."""
    model: Any = _gcvit((224, 320))
    src = _save(model, tmp_path / "in.safetensors")
    vitresize.convert(src, tmp_path / "out.safetensors", img_size=448, from_img_size=(224, 320))
    out = load_file(str(tmp_path / "out.safetensors"))
    _gcvit(448).load_state_dict(out, strict=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    for s, stage in enumerate(model.stages):
        for block in stage.blocks:
            block.attn.rel_pos.set_window_size((448 // GC_RATIOS[s], 448 // GC_RATIOS[s]))
    _assert_close(out, {k: v.contiguous() for k, v in model.state_dict().items()}, sd)


@pytest.mark.parametrize(
    ("build", "target", "match"),
    [
        (_gcvit, {"img_size": 200}, "not divisible by the patch size 32x32"),
        (_maxx("maxvit_tiny_tf_224"), {"img_size": (224, 300)}, "not divisible by the patch size 32x32"),
        (_maxx("coatnet_0_rw_224"), {"img_size": 208}, "multiples of 32"),
        (_gcvit, {"patch": 16}, "GCViT's stem"),
        (_maxx("maxvit_pico_rw_256"), {"patch": 16}, "MaxxViT's stem"),
        (_maxx("maxvit_pico_rw_256"), {"window": 4}, "has no window to change"),
    ],
)
def test_refused(tmp_path: Path, build: Builder, target: dict[str, Any], match: str) -> None:
    """Image sizes timm cannot build (GCViT and MaxxViT run only at multiples of 32), a new patch (conv stems),
    a window (derived from the image size)."""
    src = _save(build(), tmp_path / "in.safetensors")
    with pytest.raises(VitresizeError, match=match):
        vitresize.plan(src, **target)


@pytest.mark.parametrize(
    ("build", "kwargs"),
    [
        (_maxx("maxvit_pico_rw_256"), {"transformer_window_size": (4, 4), "transformer_grid_size": (8, 8)}),
        (_gcvit, {"window_size": (7, 7, 7, 7)}),
    ],
)
def test_own_window_sizes_are_refused(tmp_path: Path, build: Builder, kwargs: dict[str, Any]) -> None:
    """Windows set by hand (not image // ratio) would be resized to the wrong sizes: refused."""
    src = _save(build(**kwargs), tmp_path / "in.safetensors")
    with pytest.raises(VitresizeError, match="does not derive from one image size"):
        vitresize.plan(src, img_size=448)


def test_timm_hub_folder_states_no_patch(tmp_path: Path) -> None:
    """A family whose patch is the stride of its tables (here 32) takes no ``patch_size``: the folder's config
    gets the new image size only, and ``timm.create_model("local-dir:...")`` builds and loads the result."""
    from timm.models._hub import save_for_hf

    args = {**MAXX, "img_size": 256}
    model = _maxx("maxvit_pico_rw_256")(256)
    save_for_hf(model, tmp_path / "src", model_args=args, safe_serialization=True)
    vitresize.convert(tmp_path / "src", tmp_path / "out", img_size=384)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "patch_size" not in cfg["model_args"] and cfg["model_args"]["img_size"] == 384
    new = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert new.state_dict().keys() == model.state_dict().keys()
