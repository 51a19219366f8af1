"""Vision transformers beyond the plain ViT, against their library: each case builds a tiny timm model at random
init, converts it with vitresize, and checks that the output loads strictly into the model timm builds at the
target and equals what timm's own ``checkpoint_filter_fn`` makes of the source (bit for bit where timm calls
the same kernels, else within 1e-6 relative). Targets that change nothing exit 0 and name the scheme.
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
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models import beit, eva, swin_transformer, tnt, vision_transformer, vision_transformer_relpos, volo
from typer.testing import CliRunner

import vitresize
from vitresize.cli import app
from vitresize.errors import VitresizeError

Filter = Callable[[dict[str, torch.Tensor], torch.nn.Module], dict[str, torch.Tensor]]

BEIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}
SWIN = {"depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": (1, 1, 2, 2)}
ROPE = {"depth": 2, "embed_dim": 32, "num_heads": 2}
TNT = {"depth": 1, "embed_dim": 32, "inner_dim": 8, "num_heads_outer": 2, "num_heads_inner": 2}
VOLO: dict[str, Any] = {
    "layers": (1, 1, 1, 1),
    "embed_dims": (16, 32, 32, 32),
    "num_heads": (1, 2, 2, 2),
    "outlook_attention": (True, False, False, False),
}


def _volo_filter(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's NHWC resampler (VOLO has no filter of its own)."""
    out = dict(sd)
    out["pos_embed"] = resample_abs_pos_embed_nhwc(sd["pos_embed"], list(model.pos_embed.shape[1:3]))
    return out


def _model(name: str, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "volo_d1_224":  # its entry point fixes layers and widths: the class, tiny
            model = volo.VOLO(**{**VOLO, **kwargs})
        else:
            model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():  # random tables, not timm's zero init, so that resampling shows
        for k, p in model.named_parameters():
            if "relative_position" in k or "pos_embed" in k:
                p.normal_()
    return model.eval()


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


CASES = [
    # (model, build kwargs, source kwargs, target kwargs for timm, vitresize target, filter, changed keys)
    pytest.param(
        "beit_base_patch16_224",
        BEIT,
        {},
        {"img_size": 384},
        {"img_size": 384},
        beit.checkpoint_filter_fn,
        2,
        id="beit-384",
    ),
    pytest.param(
        "beit_base_patch16_224",
        BEIT,
        {},
        {"img_size": 160},
        {"img_size": 160},
        beit.checkpoint_filter_fn,
        2,
        id="beit-smaller",
    ),
    pytest.param(
        "beitv2_base_patch16_224",
        BEIT,
        {},
        {"img_size": 384},
        {"img_size": 384},
        beit.checkpoint_filter_fn,
        2,
        id="beitv2-384",
    ),
    pytest.param(
        "beit_base_patch16_224",
        BEIT,
        {},
        {"patch_size": 8},
        {"patch": 8},
        beit.checkpoint_filter_fn,
        3,
        id="beit-patch8",
    ),
    pytest.param(
        "beit_base_patch16_224",
        {**BEIT, "use_abs_pos_emb": True},
        {},
        {"img_size": 384},
        {"img_size": 384},
        beit.checkpoint_filter_fn,
        3,
        id="beit-abs-pos",
    ),
    # Hybrids: the stride of the CNN under patch_embed.backbone is read from its keys (stages / layers).
    pytest.param(
        "vit_tiny_r_s16_p8_224",
        {"depth": 1},
        {},
        {"img_size": 384},
        {"img_size": 384},
        vision_transformer.checkpoint_filter_fn,
        1,
        id="hybrid-stem-only",
    ),
    pytest.param(
        "vit_small_r26_s32_224",
        {"depth": 1},
        {},
        {"img_size": 160},
        {"img_size": 160},
        vision_transformer.checkpoint_filter_fn,
        1,
        id="hybrid-resnetv2",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "vit_small_resnet26d_224",
        {"depth": 1},
        {},
        {"img_size": (224, 320)},
        {"img_size": "224x320"},
        vision_transformer.checkpoint_filter_fn,
        1,
        id="hybrid-resnet-d",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "swin_tiny_patch4_window7_224",
        SWIN,
        {},
        {"img_size": 384, "window_size": 12},
        {"img_size": 384, "window": 12},
        swin_transformer.checkpoint_filter_fn,
        4,
        id="swin-384-window12",
    ),
    pytest.param(
        "swin_tiny_patch4_window7_224",
        SWIN,
        {},
        {"img_size": 224, "window_size": 12},
        {"window": 12, "from_img_size": 224},
        swin_transformer.checkpoint_filter_fn,
        3,
        id="swin-window12-clamped",
    ),
    pytest.param(
        "swin_tiny_patch4_window7_224",
        SWIN,
        {},
        {"img_size": 384},
        {"img_size": 384},
        swin_transformer.checkpoint_filter_fn,
        0,
        id="swin-same-window",
    ),
    pytest.param(
        "vit_small_patch16_rope_224",
        ROPE,
        {},
        {"img_size": 384},
        {"img_size": 384},
        eva.checkpoint_filter_fn,
        0,
        id="rope-384",
    ),
    pytest.param(
        "vit_small_patch16_rope_224",
        ROPE,
        {},
        {"patch_size": 8},
        {"patch": 8},
        eva.checkpoint_filter_fn,
        1,
        id="rope-patch8",
    ),
    pytest.param(
        "tnt_s_patch16_224",
        TNT,
        {},
        {"img_size": 384},
        {"img_size": 384},
        tnt.checkpoint_filter_fn,
        1,
        id="tnt-384",
    ),
    pytest.param(
        "tnt_s_patch16_224",
        TNT,
        {},
        {"img_size": (224, 320)},
        {"img_size": "224x320"},
        tnt.checkpoint_filter_fn,
        1,
        id="tnt-nonsquare",
    ),
    pytest.param("volo_d1_224", VOLO, {}, {"img_size": 384}, {"img_size": 384}, _volo_filter, 1, id="volo-384"),
    pytest.param("volo_d1_224", VOLO, {}, {"img_size": 160}, {"img_size": 160}, _volo_filter, 1, id="volo-smaller"),
    pytest.param(
        "vit_relpos_small_patch16_224",
        ROPE,
        {},
        {"img_size": 384},
        {"img_size": 384},
        vision_transformer_relpos.checkpoint_filter_fn,
        0,
        id="relpos-384",
    ),
]


@pytest.mark.parametrize(("name", "small", "src_kw", "dst_kw", "target", "oracle", "changed"), CASES)
def test_converts_as_the_library(
    tmp_path: Path,
    name: str,
    small: dict[str, Any],
    src_kw: dict[str, Any],
    dst_kw: dict[str, Any],
    target: dict[str, Any],
    oracle: Filter,
    changed: int,
) -> None:
    src_model = _model(name, **small, **src_kw)
    src = _save(src_model, tmp_path / "in.safetensors")
    rep = vitresize.convert(src, tmp_path / "out.safetensors", **target)
    assert len({c.key.split(".")[0] + c.op for c in rep.plan.changes}) <= max(changed, 1)
    assert bool(rep.plan.changes) == bool(changed)
    out = load_file(str(tmp_path / "out.safetensors"))
    dst_model = _model(name, **small, **dst_kw)
    dst_model.load_state_dict(out, strict=True)
    want = oracle(dict(src_model.state_dict()), dst_model)
    assert_tensors_close(out, want)


@pytest.mark.parametrize(
    ("name", "small", "scheme"),
    [
        ("vit_small_patch16_rope_224", ROPE, "rotary"),
        ("vit_small_patch16_dinov3", ROPE, "rotary"),
        ("vit_relpos_small_patch16_224", ROPE, "relative"),
        ("swinv2_tiny_window8_256", SWIN, "relative"),
        ("twins_svt_small", {"depths": (1, 1, 1, 1)}, "conditional"),
        ("xcit_nano_12_p16_224", {"depth": 1}, "sincos"),
        ("naflexvit_base_patch16_gap", {"depth": 1, "embed_dim": 32, "num_heads": 2}, "runtime"),
    ],
)
def test_nothing_to_change_is_a_success(tmp_path: Path, name: str, small: dict[str, Any], scheme: str) -> None:
    src = _save(_model(name, **small), tmp_path / "in.safetensors")
    res = CliRunner().invoke(
        app, ["convert", str(src), str(tmp_path / "out.safetensors"), "--img-size", "384", "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["changes"] == []
    assert doc["scheme"] == scheme
    assert any("nothing to resample" in w and "encodes positions by" in w for w in doc["warnings"])
    ins = vitresize.inspect(src)
    assert ins.embeddings[0].scheme == scheme


def test_window_on_a_model_without_one_is_refused(tmp_path: Path) -> None:
    src = _save(_model("beit_base_patch16_224", **BEIT), tmp_path / "in.safetensors")
    with pytest.raises(VitresizeError, match="has no window to change"):
        vitresize.plan(src, window=12)


def test_patch_of_a_conv_stem_is_refused(tmp_path: Path) -> None:
    src = _save(_model("xcit_nano_12_p16_224", depth=1), tmp_path / "in.safetensors")
    with pytest.raises(VitresizeError, match="stride-2 convolutions"):
        vitresize.plan(src, patch=8)


def test_unknown_positional_key_refuses(tmp_path: Path) -> None:
    sd = {k: v.contiguous() for k, v in _model("vit_small_patch16_rope_224", **ROPE).state_dict().items()}
    sd["blocks.0.attn.rope_table"] = torch.zeros(196, 16)
    path = tmp_path / "in.safetensors"
    save_file(sd, str(path))
    with pytest.raises(VitresizeError, match="rope_table looks tied to positions"):
        vitresize.plan(path, img_size=384)


def test_beit_index_buffers_are_regenerated(tmp_path: Path) -> None:
    """Original BEiT checkpoints save relative_position_index: it is rebuilt for the new grid, as timm builds it."""
    model = _model("beit_base_patch16_224", **BEIT)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, buf in model.named_buffers():
        if name.endswith("relative_position_index"):
            sd[name] = buf.contiguous()
    path = tmp_path / "in.safetensors"
    save_file(sd, str(path))
    vitresize.convert(path, tmp_path / "out.safetensors", img_size=384)
    out = load_file(str(tmp_path / "out.safetensors"))
    big = _model("beit_base_patch16_224", **BEIT, img_size=384)
    for name, buf in big.named_buffers():
        if name.endswith("relative_position_index"):
            assert torch.equal(out[name], buf), name


def test_a_fixed_grid_is_refused(tmp_path: Path) -> None:
    """EfficientFormer's last stage attends over a fixed 7x7 grid: no image size but its own runs."""
    src = _save(_model("efficientformer_l1"), tmp_path / "in.safetensors")
    with pytest.raises(VitresizeError, match="fixed 7x7 grid"):
        vitresize.plan(src, img_size=384)


def test_method_beit_is_the_original_cubic_recipe(tmp_path: Path) -> None:
    """The original BEiT code: SciPy interp2d(kind="cubic") on the geometric grid = RectBivariateSpline(s=0),
    evaluated in float64 and cast to float32; vitresize reproduces it without SciPy, bit for bit."""
    import numpy as np
    from scipy.interpolate import RectBivariateSpline

    from vitresize.resample.tables import _offsets

    model = _model("beit_base_patch16_224", **BEIT)
    src = _save(model, tmp_path / "in.safetensors")
    rep = vitresize.convert(src, tmp_path / "out.safetensors", img_size=384, method="beit")
    assert rep.plan.method == "beit"
    out = load_file(str(tmp_path / "out.safetensors"))
    _model("beit_base_patch16_224", **BEIT, img_size=384).load_state_dict(out, strict=True)
    old, new = 27, 47  # 2 * 14 - 1, 2 * 24 - 1
    y = _offsets(old, new)
    d = np.arange(-(new // 2.0), new // 2.0 + 0.1, 1.0)
    for k, v in model.state_dict().items():
        if k.endswith("relative_position_bias_table"):
            for h in range(v.shape[1]):
                z = v[:-3, h].reshape(old, old).double().numpy()
                want = RectBivariateSpline(y, y, z, kx=3, ky=3, s=0)(d, d).astype(np.float32)
                assert np.array_equal(out[k][:-3, h].reshape(new, new).numpy(), want), k
            assert torch.equal(out[k][-3:], v[-3:])


@pytest.mark.parametrize(
    ("name", "args", "target", "want"),
    [
        ("swin_tiny_patch4_window7_224", {**SWIN, "img_size": 224}, {"img_size": 384, "window": 12}, (384, 12)),
        ("vit_small_patch16_rope_224", {**ROPE, "img_size": 224}, {"img_size": 384}, (384, None)),
    ],
)
def test_timm_hub_folder_gets_the_new_geometry(
    tmp_path: Path, name: str, args: dict[str, Any], target: dict[str, Any], want: tuple[int, int | None]
) -> None:
    """A timm hub folder: config.json says the new image size (and window), also when no tensor changes, and
    ``timm.create_model("local-dir:...")`` builds the model at the target and loads the converted weights."""
    from timm.models._hub import save_for_hf

    model = _model(name, **args)
    save_for_hf(model, tmp_path / "src", model_args=args, safe_serialization=True)
    vitresize.convert(tmp_path / "src", tmp_path / "out", **target)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["pretrained_cfg"]["input_size"] == [3, want[0], want[0]]
    assert cfg["model_args"].get("window_size") == want[1]
    new = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert tuple(new.patch_embed.img_size) == (want[0], want[0])


@pytest.mark.parametrize(
    ("name", "small", "target"),
    [
        ("beit_base_patch16_224", BEIT, {"img_size": 384}),
        ("swin_tiny_patch4_window7_224", SWIN, {"img_size": 384, "window": 12}),
        ("volo_d1_224", VOLO, {"img_size": 160}),
    ],
)
def test_every_output_format_holds_the_same_tensors(
    tmp_path: Path, name: str, small: dict[str, Any], target: dict[str, Any]
) -> None:
    """From a training checkpoint (``{"model": ..., "epoch": ...}``), each writer a torch input can go to (.pth
    keeps the container, .safetensors the state dict; .npz is for JAX inputs) holds the same tensors, bit for
    bit."""
    sd = {k: v.contiguous() for k, v in _model(name, **small).state_dict().items()}
    src = tmp_path / "in.pth"
    torch.save({"model": sd, "epoch": 3}, src)
    outs: dict[str, dict[str, torch.Tensor]] = {}
    for suffix in (".safetensors", ".pth"):
        vitresize.convert(src, tmp_path / f"out{suffix}", **target)
    outs["safetensors"] = load_file(str(tmp_path / "out.safetensors"))
    pth = torch.load(tmp_path / "out.pth", weights_only=True)
    assert pth["epoch"] == 3
    outs["pth"] = pth["model"]
    ref = outs["safetensors"]
    for fmt, got in outs.items():
        assert got.keys() == ref.keys(), fmt
        for k, v in ref.items():
            assert torch.equal(got[k], v), (fmt, k)


def test_zero_size_tied_table_is_refused_in_one_line(tmp_path: Path) -> None:
    sd = {k: v.contiguous() for k, v in _model("swin_tiny_patch4_window7_224", **SWIN).state_dict().items()}
    sd["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(169, 0)
    save_file(sd, str(tmp_path / "z.safetensors"))
    res = CliRunner().invoke(
        app, ["convert", str(tmp_path / "z.safetensors"), str(tmp_path / "o.safetensors"), "--window", "12"]
    )
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "zero-size dimension" in lines[0], res.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_rope_mixed_frequencies_are_not_tied(tmp_path: Path) -> None:
    """The learned RoPE frequencies (``rope.freqs``) of ``vit_*_rope_mixed_ape`` do not depend on the grid: its
    absolute table converts as timm's Eva filter resamples it."""
    model = _model("vit_base_patch16_rope_mixed_ape_224", depth=1, embed_dim=64, num_heads=2)
    src = _save(model, tmp_path / "in.safetensors")
    vitresize.convert(src, tmp_path / "out.safetensors", img_size=256)
    out = load_file(str(tmp_path / "out.safetensors"))
    dst = _model("vit_base_patch16_rope_mixed_ape_224", depth=1, embed_dim=64, num_heads=2, img_size=256)
    dst.load_state_dict(out, strict=True)
    assert_tensors_close(out, eva.checkpoint_filter_fn(dict(model.state_dict()), dst))


def test_a_nested_copy_is_its_own_model(tmp_path: Path) -> None:
    """A ViT at the root and a copy under ``teacher.``: both are converted (the copy's table is not the root
    model's unknown key)."""
    sd = {k: v.contiguous() for k, v in _model("vit_small_patch16_rope_224", **ROPE).state_dict().items()}
    vit = {k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224", depth=1).state_dict().items()}
    both = {**vit, **{"teacher." + k: v.clone() for k, v in vit.items()}, **{"student." + k: v for k, v in sd.items()}}
    save_file(both, str(tmp_path / "n.safetensors"))
    with vitresize.plan(tmp_path / "n.safetensors", img_size=384) as p:
        assert sorted(c.key for c in p.changes) == ["pos_embed", "teacher.pos_embed"]
        assert {m.embedding.key_prefix for m in p.models} == {"", "teacher.", "student."}


def test_a_source_the_family_cannot_run_is_a_note_in_inspect(tmp_path: Path) -> None:
    """A derived table that fits no grid the library runs: ``inspect`` notes it (exit 0), ``convert`` refuses it
    as a problem of the source (exit 1)."""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=(8, 16, 32, 64), num_heads=(1, 1, 1, 1))
    model = MultiScaleVit(cfg, img_size=128, num_classes=0)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["stages.0.blocks.0.attn.rel_pos_h"] = torch.randn(9, 8)
    sd["stages.0.blocks.0.attn.rel_pos_w"] = torch.randn(9, 8)
    save_file(sd, str(tmp_path / "m.safetensors"))
    (e,) = vitresize.inspect(tmp_path / "m.safetensors").embeddings
    assert e.source is None and e.note
    with pytest.raises(VitresizeError):
        vitresize.plan(tmp_path / "m.safetensors", img_size=256)
