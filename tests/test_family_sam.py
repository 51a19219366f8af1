"""timm SAM ViT, MViTv2 and Hiera (timm 1.0.31), against timm itself.

Each case builds a tiny timm model at random init (its tied tables randomized: timm zero-inits some), converts
it with vitresize, loads the output strictly into the model timm builds at the target, runs it there, and
compares every tensor with what timm makes of the source:

* SAM (``vision_transformer_sam``): timm's ``checkpoint_filter_fn`` resizes nothing; the model resamples at run
  time, ``pos_embed`` with ``timm.layers.resample_abs_pos_embed_nhwc`` and the relative tables with
  ``get_rel_pos`` (the table is read back from ``get_rel_pos``'s output). Stronger: the model built at the source
  size and fed the target's images gives the same output, bit for bit, as the one built at the target with the
  converted weights. A new patch: ``timm.layers.resample_patch_embed`` (timm's ViT filter; SAM's has none).
* MViTv2 (``mvitv2``): its ``checkpoint_filter_fn`` (given a copy: it mutates its input).
* Hiera (``hiera``): its ``checkpoint_filter_fn`` (renames only), then ``resample_abs_pos_embed`` with no prefix
  rows, as the filter's commented-out code would.
* Hiera abswin and Hiera-Det (SAM2): nothing depends on the image size; the tensors are copied.

Half precision: the relative tables are interpolated in float32 and cast back, where timm interpolates in the
table's own dtype; bfloat16 differs by up to 0.0156 (1 ulp) and float16 by up to 0.00195 on N(0, 1) tables.
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
import torch.nn.functional as F
from conftest import sparse_safetensors
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc, resample_patch_embed
from timm.models import hiera, mvitv2, vision_transformer_sam
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
from typer.testing import CliRunner

import vitresize
from vitresize.cli import app
from vitresize.errors import UsageError, VitresizeError

SD = dict[str, torch.Tensor]

SAM = {"embed_dim": 32, "depth": 4, "num_heads": 2, "global_attn_indexes": (1, 3), "window_size": 4, "neck_chans": 16}
HIERA = {"stages": (1, 1, 1, 1), "embed_dim": 8, "num_heads": 1}
MVIT = {"depths": (1, 2, 2, 2), "embed_dim": 8, "num_heads": 1}  # timm's strides (stride_q, adaptive kv)


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "pos" in k:
                p.normal_()
    return model.eval()


def _timm(name: str, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _randomized(timm.create_model(name, pretrained=False, **kwargs))


def _sam(img: Any = 128, **kwargs: Any) -> torch.nn.Module:
    return _timm("samvit_base_patch16", img_size=img, **{**SAM, **kwargs})


def _mvit(img: int = 128, **cfg: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return _randomized(MultiScaleVit(MultiScaleVitCfg(**{**MVIT, **cfg}), img_size=img, num_classes=0))


def _hiera(img: Any = 64, **kwargs: Any) -> torch.nn.Module:
    return _timm("hiera_tiny_224", img_size=img, num_classes=0, **{**HIERA, **kwargs})


def _save(model: torch.nn.Module | SD, path: Path) -> Path:
    sd = model if isinstance(model, dict) else model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _assert_close(out: SD, want: SD, source: SD) -> None:
    """Every tensor as the oracle's; the ones it leaves alone bit-identical to the source."""
    assert set(out) == set(want)
    for k, v in want.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
        if v.shape == source[k].shape and torch.equal(v, source[k]):
            assert torch.equal(out[k], source[k]), k
        else:
            torch.testing.assert_close(out[k], v, rtol=1e-6, atol=1e-6, msg=k)


def _convert(tmp_path: Path, src: torch.nn.Module | SD, **target: Any) -> tuple[vitresize.Report, SD]:
    path = _save(src, tmp_path / "in.safetensors")
    report = vitresize.convert(path, tmp_path / "out.safetensors", **target)
    return report, load_file(str(tmp_path / "out.safetensors"))


def _image(model: torch.nn.Module, size: tuple[int, int]) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1, 3, *size)


def _assert_refused(path: Path, match: str, **target: Any) -> None:
    """The plan is refused with a message containing ``match`` (an ``AssertionError`` if it is not)."""
    try:
        vitresize.plan(path, **target).close()
    except VitresizeError as e:
        assert match in str(e), str(e)
    else:
        raise AssertionError(f"planned {target}")


# -- SAM ViT ---------------------------------------------------------------------------------------------------------


def _rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """The table ``get_rel_pos`` reads for a ``(length + 1) / 2`` grid, read back from what it returns."""
    n = (length + 1) // 2
    r = vision_transformer_sam.get_rel_pos(n, n, table)  # r[q, k] = table'[q - k + n - 1]
    return torch.cat([r[0].flip(0), r[-1].flip(0)[1:]])


def _sam_oracle(sd: SD, dst: torch.nn.Module) -> SD:
    """What the SAM model at the target does with the source's tensors at run time (patch: timm's PI-resize)."""
    out = {}
    for k, v in vision_transformer_sam.checkpoint_filter_fn(dict(sd), dst).items():
        shape = dst.state_dict()[k].shape
        if v.shape == shape:
            out[k] = v
        elif k == "pos_embed":
            out[k] = resample_abs_pos_embed_nhwc(v, list(shape[1:3]))
        elif k.endswith(("rel_pos_h", "rel_pos_w")):
            out[k] = _rel_pos(v, shape[0])
        else:
            assert k == "patch_embed.proj.weight", k
            out[k] = resample_patch_embed(v, list(shape[-2:]))
    return out


SAM_CASES = [
    # (vitresize target, timm kwargs at the target, changed keys)
    pytest.param({"img_size": 192}, {"img": 192}, 5, id="larger"),
    pytest.param({"img_size": 96}, {"img": 96}, 5, id="smaller"),
    pytest.param({"img_size": 64}, {"img": 64}, 5, id="grid-equals-window"),
    pytest.param({"img_size": "96x160"}, {"img": (96, 160)}, 5, id="non-square"),
    pytest.param({"patch": 8}, {"img": 128, "patch_size": 8}, 6, id="patch8"),
    pytest.param({"img_size": 64, "patch": 8}, {"img": 64, "patch_size": 8}, 1, id="patch8-same-grid"),
    pytest.param({"window": 6}, {"img": 128, "window_size": 6}, 4, id="window6"),
    pytest.param({"img_size": 192, "window": 6}, {"img": 192, "window_size": 6}, 9, id="larger-window6"),
]


@pytest.mark.parametrize(("target", "dst_kw", "changed"), SAM_CASES)
def test_sam_converts_as_timm_runs_it(
    tmp_path: Path, target: dict[str, Any], dst_kw: dict[str, Any], changed: int
) -> None:
    src = _sam()
    report, out = _convert(tmp_path, src, **target)
    assert len(report.plan.changes) == changed
    dst = _sam(**dst_kw)
    dst.load_state_dict(out, strict=True)
    _assert_close(out, _sam_oracle(src.state_dict(), dst), src.state_dict())
    img = dst.patch_embed.img_size
    if "patch_size" not in dst_kw and "window_size" not in dst_kw:
        # the source model fed the target's images: timm resamples at run time, to the same values
        x = _image(dst, img)
        with torch.no_grad():
            assert torch.equal(src.forward_features(x), dst.forward_features(x))


def test_sam_original_checkpoint_keys(tmp_path: Path) -> None:
    """An original SAM checkpoint (``image_encoder.``, ``mlp.lin``, prompt encoder and mask decoder beside it):
    the image encoder is converted, the rest copied; timm's filter then loads it at the target."""
    src = _sam()
    sd = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in src.state_dict().items()}
    sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 16)
    sd["mask_decoder.iou_token.weight"] = torch.randn(1, 16)
    report, out = _convert(tmp_path, sd, img_size=192)
    assert {c.key for c in report.plan.changes} == {
        "image_encoder.pos_embed",
        *(f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in (1, 3) for a in "hw"),
    }
    for k in ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "mask_decoder.iou_token.weight"):
        assert torch.equal(out[k], sd[k])
    dst = _sam(192)
    filtered = vision_transformer_sam.checkpoint_filter_fn(out, dst)
    dst.load_state_dict(filtered, strict=True)
    _assert_close(filtered, _sam_oracle(src.state_dict(), dst), src.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_sam_half_precision(tmp_path: Path, dtype: torch.dtype) -> None:
    """``pos_embed`` as timm's (it upcasts); the 1-D tables as ``get_rel_pos`` runs them: in the table's own
    dtype, bit for bit."""
    src = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _sam().state_dict().items()}
    _, out = _convert(tmp_path, src, img_size=192)
    dst = _sam(192).to(dtype)
    dst.load_state_dict(out, strict=True)
    assert torch.equal(out["pos_embed"], resample_abs_pos_embed_nhwc(src["pos_embed"], [12, 12]))
    for i in (1, 3):
        for a in "hw":
            k = f"blocks.{i}.attn.rel_pos_{a}"
            assert torch.equal(out[k], _rel_pos(src[k], 23)), k


def test_sam_inspect_and_cli(tmp_path: Path) -> None:
    src = _save(_sam(), tmp_path / "in.safetensors")
    (e,) = vitresize.inspect(src).embeddings
    assert e.family == "timm-sam" and e.scheme == "absolute" and e.window == (4, 4)
    assert e.source is not None and e.source.grid == (8, 8) and e.source.patch == (16, 16)
    assert len(e.tied) == 8
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "o.safetensors"), "--img-size", "192", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["family"] == "timm-sam" and doc["new_grid"] == [12, 12]
    assert sorted(c["key"] for c in doc["changes"])[0] == "blocks.1.attn.rel_pos_h"


def test_sam_without_pos_embed_needs_its_grid(tmp_path: Path) -> None:
    """A SAM without ``pos_embed`` whose tables differ in length: which are global (over the grid) cannot be read
    from the weights, so the source size must be given; with it, it converts as timm runs it."""
    src = _save(_sam(use_abs_pos=False), tmp_path / "in.safetensors")
    with pytest.raises(VitresizeError, match="which is not known"):
        vitresize.plan(src, img_size=192)
    vitresize.convert(src, tmp_path / "out.safetensors", img_size=192, from_img_size=128)
    _sam(192, use_abs_pos=False).load_state_dict(load_file(str(tmp_path / "out.safetensors")), strict=True)


def test_sam_grid_equal_to_window_is_refused(tmp_path: Path) -> None:
    src = _save(_sam(64), tmp_path / "in.safetensors")  # grid 4 == window 4: every table is [7, 16]
    _assert_refused(src, "spans both", img_size=128)


def test_sam_non_square_window_is_refused(tmp_path: Path) -> None:
    src = _save(_sam(), tmp_path / "in.safetensors")
    _assert_refused(src, "window", window="4x6")


# -- MViTv2 ----------------------------------------------------------------------------------------------------------


MVIT_CASES = [
    pytest.param(128, 192, {}, id="larger"),
    pytest.param(128, 64, {}, id="smaller"),
    pytest.param(96, 128, {"use_cls_token": True}, id="cls"),
]


@pytest.mark.parametrize(("src_img", "dst_img", "cfg"), MVIT_CASES)
def test_mvitv2_converts_as_timms_filter(tmp_path: Path, src_img: int, dst_img: int, cfg: dict[str, Any]) -> None:
    src = _mvit(src_img, **cfg)
    report, out = _convert(tmp_path, src, img_size=dst_img)
    assert {c.op for c in report.plan.changes} == {"rel_pos_1d"}
    assert len(report.plan.changes) == 2 * sum(MVIT["depths"])
    dst = _mvit(dst_img, **cfg)
    dst.load_state_dict(out, strict=True)
    sd = src.state_dict()
    _assert_close(out, mvitv2.checkpoint_filter_fn(dict(sd), dst), sd)
    if dst_img < src_img:  # it runs at the target (cheap at the small one)
        with torch.no_grad():
            assert dst(_image(dst, (dst_img, dst_img))).isfinite().all()


def test_mvitv2_inspect_and_cli(tmp_path: Path) -> None:
    src = _save(_mvit(), tmp_path / "in.safetensors")
    (e,) = vitresize.inspect(src).embeddings
    assert e.family == "timm-mvitv2" and e.scheme == "relative" and e.img_size == (128, 128)
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "o.safetensors"), "--img-size", "256", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["family"] == "timm-mvitv2" and doc["new_img_size"] == [256, 256] and doc["new_patch"] == [4, 4]


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ({"img_size": "128x192"}, "square image sizes"),
        ({"img_size": 240}, "multiple of 32"),
        ({"grid": 30}, "multiple of 32"),
        ({"patch": 8}, "7x7 stride-4 stem conv"),
        ({"window": 4}, "has no window to change"),
    ],
)
def test_mvitv2_refusals(tmp_path: Path, target: dict[str, Any], match: str) -> None:
    src = _save(_mvit(), tmp_path / "in.safetensors")
    with pytest.raises(UsageError, match=match):
        vitresize.plan(src, **target)


def test_mvitv2_unknown_strides_are_refused(tmp_path: Path) -> None:
    src = _save(_mvit(stride_q=((1, 1), (2, 2), (2, 2), (1, 1))), tmp_path / "in.safetensors")
    _assert_refused(src, "rel_pos", img_size=256)


# -- Hiera -----------------------------------------------------------------------------------------------------------


def _hiera_oracle(sd: SD, src: torch.nn.Module, dst: torch.nn.Module) -> SD:
    out = hiera.checkpoint_filter_fn(dict(sd), dst)
    out["pos_embed"] = resample_abs_pos_embed(
        out["pos_embed"],
        new_size=list(dst.tokens_spatial_shape),
        old_size=list(src.tokens_spatial_shape),
        num_prefix_tokens=0,
    )
    return out


HIERA_CASES = [
    pytest.param(64, {"img_size": 128}, 128, id="larger"),
    pytest.param(128, {"img_size": 64}, 64, id="smaller"),
    pytest.param(64, {"img_size": "64x96"}, (64, 96), id="non-square"),
    pytest.param((64, 96), {"img_size": 128, "from_img_size": "64x96"}, 128, id="non-square-source"),
    pytest.param(64, {"grid": 24}, 96, id="grid"),
]


@pytest.mark.parametrize(("src_img", "target", "dst_img"), HIERA_CASES)
def test_hiera_converts_as_timm(tmp_path: Path, src_img: Any, target: dict[str, Any], dst_img: Any) -> None:
    src = _hiera(src_img)
    report, out = _convert(tmp_path, src, **target)
    assert [c.key for c in report.plan.changes] == ["pos_embed"]  # the stem's kernel never changes
    dst = _hiera(dst_img)
    dst.load_state_dict(out, strict=True)
    sd = src.state_dict()
    _assert_close(out, _hiera_oracle(sd, src, dst), sd)
    size = (dst_img, dst_img) if isinstance(dst_img, int) else dst_img
    with torch.no_grad():
        assert dst(_image(dst, size)).isfinite().all()


def test_hiera_inspect_and_cli(tmp_path: Path) -> None:
    src = _save(_hiera(), tmp_path / "in.safetensors")
    (e,) = vitresize.inspect(src).embeddings
    assert e.family == "timm-hiera" and e.scheme == "absolute" and e.stride_known
    assert e.source is not None and e.source.patch == (4, 4) and e.img_size == (64, 64) and e.note is None
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "o.safetensors"), "--img-size", "128", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["family"] == "timm-hiera" and doc["new_grid"] == [32, 32] and doc["new_patch"] == [4, 4]


def test_hiera_patch_is_refused(tmp_path: Path) -> None:
    src = _save(_hiera(), tmp_path / "in.safetensors")
    with pytest.raises(UsageError, match="patch cannot change"):
        vitresize.plan(src, img_size=128, patch=8)


def test_hiera_other_stem_kernel_needs_the_source_size(tmp_path: Path) -> None:
    """A stem kernel other than timm's 7x7: the stride is not assumed, so the image size must be given."""
    src = _hiera(patch_kernel=(5, 5), patch_padding=(2, 2))
    path = _save(src, tmp_path / "in.safetensors")
    with pytest.raises(UsageError, match="pass from_img_size"):
        vitresize.plan(path, img_size=128)
    _, out = _convert(tmp_path, src, img_size=128, from_img_size=64)
    _hiera(128, patch_kernel=(5, 5), patch_padding=(2, 2)).load_state_dict(out, strict=True)


def test_hiera_image_not_multiple_of_32_is_refused(tmp_path: Path) -> None:
    src = _save(_hiera(), tmp_path / "in.safetensors")
    _assert_refused(src, "32", img_size=80)


RUNTIME: list[Any] = [
    pytest.param(
        lambda: _timm("hiera_small_abswin_256", img_size=64, global_pos_size=(4, 4), num_classes=0, **HIERA),
        lambda: _timm("hiera_small_abswin_256", img_size=128, global_pos_size=(4, 4), num_classes=0, **HIERA),
        id="hiera-abswin",
    ),
    pytest.param(
        lambda: _timm("sam2_hiera_tiny", global_att_blocks=(), window_spec=(4, 4, 4, 4), **HIERA),
        lambda: _timm("sam2_hiera_tiny", global_att_blocks=(), window_spec=(4, 4, 4, 4), **HIERA),
        id="hieradet-sam2",
    ),
]


@pytest.mark.parametrize(("make_src", "make_dst"), RUNTIME)
def test_hiera_runtime_tables_change_nothing(
    tmp_path: Path, make_src: Callable[[], torch.nn.Module], make_dst: Callable[[], torch.nn.Module]
) -> None:
    src = _save(make_src(), tmp_path / "in.safetensors")
    dst_path = tmp_path / "o.safetensors"
    res = CliRunner().invoke(app, ["convert", str(src), str(dst_path), "--img-size", "128", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["changes"] == [] and doc["scheme"] == "runtime" and doc["family"] == "timm-hiera-abswin"
    assert any("nothing to resample" in w and "at run time" in w for w in doc["warnings"])
    sd, out = load_file(str(src)), load_file(str(dst_path))
    assert set(out) == set(sd) and all(torch.equal(out[k], sd[k]) for k in sd)
    dst = make_dst()
    dst.load_state_dict(out, strict=True)
    with torch.no_grad():
        y = dst.forward_features(_image(dst, (128, 128)))
    assert y.isfinite().all()
    (e,) = vitresize.inspect(src).embeddings
    assert e.scheme == "runtime" and e.pos_key is None
    with pytest.raises(UsageError, match="7x7 stride-4 stem conv"):
        vitresize.plan(src, patch=8)


# -- full-size registered models, planned from headers only ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("samvit_base_patch16", 512),
        ("samvit_huge_patch16", 1120),
        ("mvitv2_tiny", 384),
        ("mvitv2_base", 448),
        ("mvitv2_small_cls", 160),
        ("hiera_tiny_224", 448),
        ("hiera_huge_224", 256),
    ],
)
def test_registered_models_plan_timms_shapes(tmp_path: Path, name: str, target: int) -> None:
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        source = timm.create_model(name, pretrained=False)
        want = {
            k: tuple(v.shape)
            for k, v in timm.create_model(name, pretrained=False, img_size=target).state_dict().items()
        }
    path = tmp_path / "m.safetensors"
    sparse_safetensors(source, path)
    with vitresize.plan(path, img_size=target) as p:
        planned = {c.key: tuple(c.new_shape) for c in p.changes}
    assert planned
    for k, v in source.state_dict().items():
        assert planned.get(k, tuple(v.shape)) == want[k], k


def test_get_rel_pos_readback() -> None:
    """The test's reading of ``get_rel_pos``'s output is the table it interpolated."""
    t = torch.randn(7, 4)
    assert torch.equal(_rel_pos(t, 7), t)
    want = F.interpolate(t.T[None], size=11, mode="linear")[0].T
    assert torch.equal(_rel_pos(t, 11), want)


def test_sam_without_a_table_changes_grid_and_window_together(tmp_path: Path) -> None:
    """``samvit_base_patch16_224`` has no ``pos_embed`` and its grid is its window (14): a new image size alone is
    refused (the windowed and global blocks' tables cannot be told apart), both together convert."""
    kw = {"depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}
    src = _save(_timm("samvit_base_patch16_224", **kw), tmp_path / "in.safetensors")
    with pytest.raises(VitresizeError, match="change both to the same size"):
        vitresize.plan(src, img_size=448)
    vitresize.convert(src, tmp_path / "out.safetensors", img_size=448, window=28)
    dst = _timm("samvit_base_patch16_224", img_size=448, window_size=28, **kw)
    dst.load_state_dict(load_file(str(tmp_path / "out.safetensors")), strict=True)
