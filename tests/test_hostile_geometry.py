"""Never write a checkpoint the target model cannot load (issue 11).

* A hybrid ViT (a CNN under ``patch_embed.backbone``, then a 1x1 or 8x8 ``patch_embed.proj``) and Hiera (a 7x7
  stride-4 stem) have the stem's stride as their patch: converted with the stride given, or refused.
* Integer, bool, complex and float8 tables and kernels are refused, not interpolated.
* A target far over any real ViT's size (the output, the memory to resample) is refused before anything is
  allocated, unless ``allow_large``; running out of memory anyway is one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from conftest import fixture, load_any, sparse_safetensors
from safetensors.torch import save_file

import vitresize
from vitresize.budgets import LARGE_FLOOR, MEMORY_CAP
from vitresize.errors import CheckpointFormatError, UsageError, VitresizeError
from vitresize.keymaps import TensorInfo, find_vits
from vitresize.resample.conventions import METHODS, PATCH_BASIS
from vitresize.resample.patch_embed import resample_patch_embed
from vitresize.resample.pos_embed import resample_pos_embed

# name -> the smallest model of that architecture (img 64) and the stem's stride
STEMS: dict[str, tuple[dict[str, Any], int]] = {
    "vit_tiny_r_s16_p8_224": ({"depth": 1, "embed_dim": 32, "num_heads": 1}, 32),  # 8x8 kernel after the stem
    "vit_small_r26_s32_224": ({"depth": 1, "embed_dim": 32, "num_heads": 1}, 32),  # 1x1 kernel after a ResNet-26
    "hiera_tiny_224": ({"stages": (1, 1, 1, 1), "embed_dim": 8, "num_heads": 1}, 4),  # 7x7 stride-4 stem conv
}


def _model(name: str, img: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=img, num_classes=0, **STEMS[name][0])


@pytest.fixture(scope="module")
def stem_src(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each STEMS model at 64x64, saved once as safetensors; and ``unknown``: the smallest hybrid with its
    backbone's keys renamed, so that they do not tell its stride (``patch_embed.backbone.body.*``)."""
    out = {}
    for name in STEMS:
        path = tmp_path_factory.mktemp(name) / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in _model(name, 64).state_dict().items()}, str(path))
        out[name] = path
    sd = _model("vit_tiny_r_s16_p8_224", 64).state_dict()
    renamed = {k.replace("patch_embed.backbone.", "patch_embed.backbone.body."): v.contiguous() for k, v in sd.items()}
    out["unknown"] = tmp_path_factory.mktemp("unknown") / "unknown.safetensors"
    save_file(renamed, str(out["unknown"]))
    return out


def _one_error_line(res: Any) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    return lines[0]


def test_stem_img_size_without_stride_is_refused(run: Any, stem_src: dict[str, Path], tmp_path: Path) -> None:
    """A CNN stem whose keys do not tell its stride: --img-size needs the source's image size."""
    dst = tmp_path / "o.safetensors"
    res = run("convert", stem_src["unknown"], dst, "--img-size", "128")
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert "patch_embed.proj.weight" in line and "--from-img-size" in line and "--grid" in line
    assert not dst.exists()


@pytest.mark.parametrize("name", list(STEMS))
def test_stem_stride_is_read_from_the_keys(run: Any, stem_src: dict[str, Path], tmp_path: Path, name: str) -> None:
    """The hybrids' stride comes from their backbone's stages; Hiera's is its family's."""
    dst = tmp_path / "o.safetensors"
    res = run("convert", stem_src[name], dst, "--img-size", "128", "--json")
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    stride = STEMS[name][1]
    assert rep["old_patch"] == rep["new_patch"] == [stride, stride] and rep["old_img_size"] == [64, 64]
    _model(name, 128).load_state_dict(load_any(dst), strict=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("name", list(STEMS))
def test_stem_with_source_size_loads_strictly(
    run: Any, stem_src: dict[str, Path], tmp_path: Path, name: str, suffix: str
) -> None:
    dst = tmp_path / f"o{suffix}"
    res = run("convert", stem_src[name], dst, "--img-size", "128", "--from-img-size", "64", "--json")
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    stride = STEMS[name][1]
    assert rep["old_patch"] == rep["new_patch"] == [stride, stride]
    assert rep["new_grid"] == [128 // stride, 128 // stride] and rep["new_img_size"] == [128, 128]
    assert [c["key"] for c in rep["changes"]] == ["pos_embed"]  # the kernel never changes
    out = load_any(dst)
    _model(name, 128).load_state_dict(out, strict=True)


def test_stem_grid_target_needs_no_stride(run: Any, stem_src: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    res = run("convert", stem_src["unknown"], dst, "--grid", "4", "--json")
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["new_grid"] == [4, 4] and rep["new_img_size"] is None and rep["new_patch"] is None
    assert any("not the patch" in w for w in rep["warnings"])


@pytest.mark.parametrize("name", list(STEMS))
def test_stem_patch_is_refused(run: Any, stem_src: dict[str, Path], tmp_path: Path, name: str) -> None:
    dst = tmp_path / "o.safetensors"
    res = run("convert", stem_src[name], dst, "--img-size", "128", "--from-img-size", "64", "--patch", "16")
    assert res.exit_code == 2
    assert "--patch cannot change" in _one_error_line(res)
    assert not dst.exists()


def test_stem_from_img_size_that_fits_no_stride(run: Any, stem_src: dict[str, Path], tmp_path: Path) -> None:
    # 4 patches (or 5): no square stride cuts a 64x48 image into that many
    src = stem_src["unknown"]
    res = run("convert", src, tmp_path / "o.pth", "--img-size", "128", "--from-img-size", "64x48")
    assert res.exit_code == 1
    assert "no stride" in _one_error_line(res)


def test_stem_inspect_says_the_stride_is_unknown(stem_src: dict[str, Path]) -> None:
    (e,) = vitresize.inspect(stem_src["unknown"]).embeddings
    assert e.stem is not None and "patch_embed.backbone." in e.stem and not e.stride_known
    d = e.to_dict()
    assert d["grid"] == [2, 2] and d["patch"] is None and d["img_size"] is None
    assert e.note is not None and "pass from_img_size" in e.note and "pass --from-img-size" in e.note.cli  # type: ignore[attr-defined]
    (e,) = vitresize.inspect(stem_src["unknown"], from_img_size=64).embeddings
    assert e.stride_known and e.source is not None and e.source.patch == (32, 32) and e.source.img_size == (64, 64)


def _timm_config(folder: Path, name: str, img: int) -> None:
    cfg = {"architecture": name, "num_classes": 0, "pretrained_cfg": {"input_size": [3, img, img]}}
    (folder / "config.json").write_text(json.dumps(cfg))


def test_stem_stride_from_config_beside_the_file(run: Any, stem_src: dict[str, Path], tmp_path: Path) -> None:
    name = "vit_tiny_r_s16_p8_224"
    src = tmp_path / "in" / "model.safetensors"
    src.parent.mkdir()
    src.write_bytes(stem_src[name].read_bytes())
    _timm_config(src.parent, name, 64)
    dst = tmp_path / "o.safetensors"
    res = run("convert", src, dst, "--img-size", "128")
    assert res.exit_code == 0, res.stderr
    assert "set the image size 128x128 in it by hand" in res.stderr
    _model(name, 128).load_state_dict(load_any(dst), strict=True)


def test_stem_folder_with_config_is_refused(run: Any, stem_src: dict[str, Path], tmp_path: Path) -> None:
    """The folder writer would state the stride as patch_size, which a hybrid cannot be built with."""
    name = "vit_small_r26_s32_224"
    src = tmp_path / "in"
    src.mkdir()
    (src / "model.safetensors").write_bytes(stem_src[name].read_bytes())
    _timm_config(src, name, 64)
    res = run("convert", src, tmp_path / "out", "--img-size", "128")
    assert res.exit_code == 2
    assert "cannot be rewritten" in _one_error_line(res)
    assert not (tmp_path / "out").exists()


def test_qwen3_encoder_is_left_alone(run: Any, tmp_path: Path) -> None:
    m = timm.create_model(
        "qwen3_vit_88m_enc", pretrained=False, img_size=64, depth=1, embed_dim=32, num_heads=1, pos_embed_grid_size=4
    )
    src = tmp_path / "q.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(src))
    res = run("convert", src, tmp_path / "o.safetensors", "--img-size", "128")
    assert res.exit_code == 1
    assert "Qwen3-VL" in _one_error_line(res)
    assert not (tmp_path / "o.safetensors").exists()


def _infos(shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(v, "float32") for k, v in shapes.items()}


def test_stems_of_other_families_are_seen() -> None:
    """Hugging Face ViTHybrid (a BiT under the patch embeddings) and vit_jax R50+ViT (a ResNet at the root)."""
    hf = _infos(
        {
            "vit.embeddings.cls_token": (1, 1, 768),
            "vit.embeddings.position_embeddings": (1, 577, 768),
            "vit.embeddings.patch_embeddings.backbone.bit.embedder.convolution.weight": (64, 3, 7, 7),
            "vit.embeddings.patch_embeddings.projection.weight": (768, 1024, 1, 1),
        }
    )
    jax = _infos(
        {
            "cls": (1, 1, 768),
            "Transformer/posembed_input/pos_embedding": (1, 577, 768),
            "conv_root/kernel": (7, 7, 3, 64),
            "block1/unit1/conv1/kernel": (1, 1, 64, 256),
            "embedding/kernel": (1, 1, 1024, 768),
        }
    )
    for tensors, family in ((hf, "hf"), (jax, "vit_jax")):
        (found,), _ = find_vits(tensors, family)
        assert found.stem is not None and "stem" in found.stem
    (plain,), _ = find_vits(_infos({"pos_embed": (1, 17, 16), "patch_embed.proj.weight": (16, 3, 8, 8)}))
    assert plain.stem is None and plain.unsupported is None
    assert vitresize.inspect(fixture("timm_vit_cls.safetensors")).embeddings[0].stem is None


# -- full-size architectures, planned from headers only (meta device, sparse file) ---------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "vit_base_r50_s16_224",
        "vit_small_r26_s32_224",
        "vit_tiny_r_s16_p8_224",
        "vit_base_resnet50d_224",
        "hiera_tiny_224",
    ],
)
def test_full_size_stems_plan_the_shape_timm_builds(tmp_path: Path, name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
        want = timm.create_model(name, pretrained=False, img_size=448).state_dict()["pos_embed"].shape
    src = tmp_path / "m.safetensors"
    sparse_safetensors(model, src)
    for given in ({}, {"from_img_size": 224}):
        with vitresize.plan(src, img_size=448, **given) as p:
            assert [(c.key, c.new_shape) for c in p.changes] == [("pos_embed", tuple(want))]


# -- dtypes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float8_e4m3fn, torch.complex64])
@pytest.mark.parametrize("key", ["pos_embed", "patch_embed.proj.weight"])
def test_non_float_tables_and_kernels_are_refused(run: Any, tmp_path: Path, dtype: torch.dtype, key: str) -> None:
    sd = load_any(fixture("timm_vit_cls.safetensors"))
    sd[key] = sd[key].to(dtype)
    src = tmp_path / "in.pth"
    torch.save(sd, src)
    dst = tmp_path / "o.pth"
    res = run("convert", src, dst, "--img-size", "48", "--patch", "4")  # grid 4x4 -> 12x12, patch 8 -> 4
    assert res.exit_code == 1
    line = _one_error_line(res)
    assert key in line and str(dtype).removeprefix("torch.") in line and "float32" in line
    assert not dst.exists()
    with pytest.raises(CheckpointFormatError):
        vitresize.plan(src, img_size=48, patch=4)


def test_resample_functions_refuse_non_float() -> None:
    with pytest.raises(ValueError, match="int64"):
        resample_pos_embed(
            torch.zeros(1, 5, 4, dtype=torch.int64),
            old_grid=(2, 2),
            new_grid=(3, 3),
            num_prefix_tokens=1,
            convention=METHODS["timm"],
        )
    with pytest.raises(ValueError, match="bool"):
        resample_patch_embed(torch.zeros(4, 3, 8, 8, dtype=torch.bool), (4, 4), basis=PATCH_BASIS)


# -- budgets --------------------------------------------------------------------------------------------------------


def test_huge_img_size_is_refused_with_the_numbers(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    res = run("convert", fixture("timm_vit_cls.safetensors"), dst, "--img-size", "100000")
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert "--img-size 100000 would make pos_embed [1, 156250001, 16]" in line
    assert "GiB" in line and "KiB" in line and "--allow-large" in line
    assert not dst.exists()


def test_huge_patch_is_refused_before_the_pinv(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    res = run("convert", fixture("timm_vit_cls.safetensors"), dst, "--img-size", "4096", "--patch", "4096")
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert "patch_embed.proj.weight" in line and "--allow-large" in line
    assert not dst.exists()


def test_memory_cap_is_checked_even_when_the_output_is_allowed(tmp_path: Path) -> None:
    # a [256, 256] kernel -> [512, 512]: the PI-resize matrix is 262144 x 65536 floats (64 GiB)
    sd = load_any(fixture("timm_vit_cls.safetensors"))
    sd["patch_embed.proj.weight"] = torch.zeros(16, 3, 256, 256)
    src = tmp_path / "big_kernel.safetensors"
    save_file(sd, str(src))  # 12 MiB: the 10x rule allows 120 MiB; the memory is what is over
    with pytest.raises(UsageError, match=r"memory to resample patch_embed\.proj\.weight .* cap"):
        vitresize.plan(src, img_size=512 * 4, patch=512)
    assert MEMORY_CAP == 4 << 30


def test_allow_large_lifts_the_tenfold_rule(tmp_path: Path) -> None:
    """576x576 grid of 16 floats: a 21 MiB output from a 24 KiB source."""
    src = fixture("timm_vit_cls.safetensors")
    dst = tmp_path / "o.safetensors"
    with pytest.raises(UsageError, match=r"img_size 4608 would make pos_embed \[1, 331777, 16\] .*x the source's"):
        vitresize.convert(src, dst, img_size=4608)
    with pytest.raises(UsageError, match="allow_large=True"):
        vitresize.convert(src, dst, img_size=4608, dry_run=True)
    assert not dst.exists()
    rep = vitresize.convert(src, dst, img_size=4608, allow_large=True)
    assert rep.bytes_written > LARGE_FLOOR
    assert load_any(dst)["pos_embed"].shape == (1, 1 + 576 * 576, 16)


def _with_broadcast(tmp_path: Path) -> Path:
    """A .pth of a few kB holding a stride-0 [3000, 3000] float32 view (36 MB written out in full)."""
    sd = load_any(fixture("timm_vit_cls.safetensors"))
    sd["buffer"] = torch.zeros(1).expand(3000, 3000)
    src = tmp_path / "in.pth"
    torch.save(sd, src)
    assert src.stat().st_size < 100_000
    return src


def test_broadcast_view_to_safetensors_is_refused(run: Any, tmp_path: Path) -> None:
    src = _with_broadcast(tmp_path)
    dst = tmp_path / "o.safetensors"
    res = run("convert", src, dst, "--img-size", "48")
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert "buffer [3000, 3000]" in line and "MiB" in line and ".pth" in line and "--allow-large" in line
    assert not dst.exists()
    res = run("convert", src, dst, "--img-size", "48", "--dry-run")
    assert res.exit_code == 2


def test_broadcast_view_to_pth_keeps_it_small(run: Any, tmp_path: Path) -> None:
    src = _with_broadcast(tmp_path)
    dst = tmp_path / "o.pth"
    res = run("convert", src, dst, "--img-size", "48")
    assert res.exit_code == 0, res.stderr
    assert dst.stat().st_size < 100_000
    assert load_any(dst)["buffer"].shape == (3000, 3000)


def test_broadcast_view_allowed_large(tmp_path: Path) -> None:
    src = _with_broadcast(tmp_path)
    dst = tmp_path / "o.safetensors"
    vitresize.convert(src, dst, img_size=48, allow_large=True)
    assert dst.stat().st_size > 36_000_000
    with vitresize.plan(src, img_size=48) as p, pytest.raises(UsageError, match="buffer"):
        p.execute(tmp_path / "o2.safetensors")


# -- out of memory ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes")],
    ids=["MemoryError", "cpu-allocator"],
)
def test_out_of_memory_is_one_line(run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    import vitresize.resample.pos_embed as pe

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(pe.F, "interpolate", boom)
    with pytest.raises(VitresizeError, match="out of memory while resampling a \\[1, 17, 16\\] position table"):
        resample_pos_embed(
            torch.zeros(1, 17, 16), old_grid=(4, 4), new_grid=(6, 6), num_prefix_tokens=1, convention=METHODS["timm"]
        )
    dst = tmp_path / "o.pth"  # a .pth output resamples with torch
    res = run("convert", fixture("timm_vit_cls.safetensors"), dst, "--img-size", "48")
    assert res.exit_code == 1
    assert "out of memory" in _one_error_line(res)
    assert not dst.exists()


def test_other_runtime_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import vitresize.resample.pos_embed as pe

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(pe.F, "interpolate", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        resample_pos_embed(
            torch.zeros(1, 17, 16), old_grid=(4, 4), new_grid=(6, 6), num_prefix_tokens=1, convention=METHODS["timm"]
        )


# --- empty tables and kernels; float8 in a .pth ------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "shape"),
    [("pos_embed", (1, 17, 0)), ("patch_embed.proj.weight", (16, 3, 0, 0)), ("patch_embed.proj.weight", (0, 3, 8, 8))],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_zero_size_table_or_kernel_is_one_line(
    run: Any, tmp_path: Path, key: str, shape: tuple[int, ...], suffix: str
) -> None:
    """A 0x0 kernel or a zero-width table was a ZeroDivisionError / interpolate traceback: it holds no weights."""
    sd = {k: v.clone() for k, v in load_any(fixture("timm_vit_cls.safetensors")).items()}
    sd[key] = torch.zeros(shape)
    src = tmp_path / f"empty{suffix}"
    if suffix == ".pth":
        torch.save(sd, src)
    else:
        save_file(sd, str(src))
    res = run("inspect", src)
    assert res.exit_code == 0 and "no ViT position embedding" in res.stderr, res.stderr
    res = run("convert", src, tmp_path / "o.safetensors", "--img-size", "48")
    assert res.exit_code == 1 and "zero-size" in _one_error_line(res)
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz])
def test_float8_table_in_a_pth_is_inspected_and_refused_in_one_line(
    run: Any, tmp_path: Path, dtype: torch.dtype
) -> None:
    """torch.isfinite has no float8 kernel for some of them: inspect counted NaN/Inf with it (a traceback)."""
    sd = {k: v.clone() for k, v in load_any(fixture("timm_vit_cls.safetensors")).items()}
    sd["pos_embed"] = sd["pos_embed"].to(dtype)
    src = tmp_path / "f8.pth"
    torch.save({"model": sd, "best": np.float64(1)}, src)  # a NumPy scalar: not indexed, torch.load reads it
    res = run("inspect", src, "--json")
    assert res.exit_code == 0, res.stderr
    res = run("convert", src, tmp_path / "o.pth", "--img-size", "48")
    assert res.exit_code == 1 and "float8" in _one_error_line(res)
