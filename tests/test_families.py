"""Checkpoint families: Hugging Face, open_clip, DINOv2 hub, JAX .npz, against each library's own code.

For each family and for a larger, a smaller, a non-square and a new-patch target: ``--method native``
matches the library's own resampling to 1e-6 in fp32, ``--method timm`` matches timm's functions, and the
output loads into the library's model built at the target size with nothing missing or mismatched.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, digest, load_any
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

import vitresize
from vitresize.errors import UsageError

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
scipy_ndimage = pytest.importorskip("scipy.ndimage")

import make_families  # noqa: E402  (fixtures/ is on sys.path via conftest)

FAM = FIXTURES / "families"

# (image size, patch size) targets relative to a 32/8 (4x4) source: larger, smaller, non-square, new patch.
TARGETS_8 = [(48, 8), (24, 8), ((32, 48), 8), (32, 4)]
TARGETS_7 = [(42, 7), (21, 7), ((28, 42), 7), (28, 14)]


def _hw(img: Any) -> tuple[int, int]:
    return (img, img) if isinstance(img, int) else tuple(img)  # type: ignore[return-value]


def _kw(img: Any, patch: int) -> dict[str, Any]:
    return {"img_size": img if isinstance(img, int) else f"{img[0]}x{img[1]}", "patch": patch}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a.float(), b.float(), atol=tol, rtol=0), float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------- Hugging Face


def _hf_embeddings(model: Any) -> Any:
    for name in ("vision_model", "vit", "deit", "dinov2"):
        if hasattr(model, name):
            model = getattr(model, name)
    return model.embeddings


def _hf_native(name: str, img: tuple[int, int]) -> torch.Tensor:
    """The source model's own ``interpolate_pos_encoding`` run at the new size (a 2-D CLIP table comes back
    3-D)."""
    model = make_families.hf_model(name)
    emb = _hf_embeddings(model)
    cfg = model.config.vision_config if hasattr(model.config, "vision_config") else model.config
    p = cfg.patch_size
    n = (img[0] // p) * (img[1] // p)
    rows = n + (2 if "deit" in name else 0 if "siglip" in name else 1)
    x = torch.zeros(1, rows, cfg.hidden_size)
    with torch.no_grad():
        return emb.interpolate_pos_encoding(x, img[0], img[1])  # type: ignore[no-any-return]


HF_NAMES = ["hf_vit", "hf_deit", "hf_dinov2", "hf_dinov2_reg", "hf_clip", "hf_siglip"]


def _pos_key(sd: dict[str, torch.Tensor]) -> str:
    keys = [k for k in sd if k.endswith(("embeddings.position_embeddings", "embeddings.position_embedding.weight"))]
    keys = [k for k in keys if not k.startswith("text_model.")]
    assert len(keys) == 1, keys
    return keys[0]


@pytest.mark.parametrize("name", HF_NAMES)
@pytest.mark.parametrize("target", [0, 1, 2, 3])
def test_hf_folder_native_matches_interpolate_pos_encoding_and_loads(name: str, target: int, tmp_path: Path) -> None:
    src = FAM / name
    cfg = json.loads((src / "config.json").read_text())
    patch = (cfg.get("vision_config") or cfg)["patch_size"]
    img, new_patch = (TARGETS_7 if patch == 7 else TARGETS_8)[target]
    out = tmp_path / "out"
    h, w = _hw(img)
    grid = (h // new_patch, w // new_patch)
    if name in ("hf_clip", "hf_siglip") and not isinstance(img, int):  # their configs take one square size
        with pytest.raises(UsageError, match="square image_size"):
            vitresize.convert(src, out, **_kw(img, new_patch))
        assert not out.exists()
        # The weights file alone converts (its config left as it is), to what the model computes at run time.
        vitresize.convert(src / "model.safetensors", tmp_path / "o.safetensors", **_kw(img, new_patch))
        got = load_file(tmp_path / "o.safetensors")
        want = _hf_native(name, (grid[0] * patch, grid[1] * patch))
        _close(got[_pos_key(got)].reshape(want.shape), want)
        return
    rep = vitresize.convert(src, out, **_kw(img, new_patch))
    assert rep.dst_format == "folder" and "config.json" in rep.rewritten
    got = load_file(out / "model.safetensors")
    key = _pos_key(got)
    # The source model's own interpolation to the new grid (at new patch sizes too: same grid, same table).
    want = _hf_native(name, (grid[0] * patch, grid[1] * patch))
    _close(got[key].reshape(want.shape), want)
    # from_pretrained on the output folder: the config says the new size, every key fits.
    new_cfg = json.loads((out / "config.json").read_text())
    vcfg = new_cfg.get("vision_config") or new_cfg
    assert _hw(vcfg["image_size"]) == (h, w) and vcfg["patch_size"] == new_patch
    cls = getattr(transformers, make_families.HF_SPECS[name]["model"])
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    emb = _hf_embeddings(model)
    kernel = emb.patch_embedding if hasattr(emb, "patch_embedding") else emb.patch_embeddings.projection
    suffixes = ("patch_embeddings.projection.weight", "embeddings.patch_embedding.weight")
    kernel_key = next(k for k in got if k.endswith(suffixes) and not k.startswith("text_model."))
    assert torch.equal(kernel.weight, got[kernel_key])
    if "dinov2_reg" in name:
        assert torch.equal(
            got["embeddings.register_tokens"], load_file(src / "model.safetensors")["embeddings.register_tokens"]
        )
    if name == "hf_clip":  # the text tower's table is untouched, byte for byte
        before = load_file(src / "model.safetensors")
        t = "text_model.embeddings.position_embedding.weight"
        assert digest(got[t]) == digest(before[t])


@pytest.mark.parametrize("name", ["hf_vit", "hf_clip"])
def test_hf_method_timm_matches_timm(name: str, tmp_path: Path) -> None:
    src = FAM / name / "model.safetensors"
    out = tmp_path / "o.safetensors"
    vitresize.convert(src, out, img_size=48, method="timm")
    before, got = load_file(src), load_file(out)
    key = _pos_key(before)
    table = before[key] if before[key].ndim == 3 else before[key].unsqueeze(0)
    want = resample_abs_pos_embed(table, [6, 6], [4, 4], num_prefix_tokens=1)
    assert torch.equal(got[key].reshape(want.shape), want)


def test_hf_file_reads_the_config_beside_it_and_leaves_it(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(FAM / "hf_vit", folder)
    rep = vitresize.convert(folder / "model.safetensors", tmp_path / "o.safetensors", img_size=48)
    assert rep.plan.models[0].embedding.geometry_from == "config.json"
    assert any("config.json" in w and "convert the folder" in w for w in rep.warnings)
    assert json.loads((folder / "config.json").read_text())["image_size"] == 32


def test_hf_non_square_source_from_config(tmp_path: Path) -> None:
    """A 32x48 HF model: its grid is read from config.json, no flags needed."""
    model = make_families.hf_model("hf_vit", image_size=(32, 48))
    model.save_pretrained(tmp_path / "src")
    ins = vitresize.inspect(tmp_path / "src")
    e = ins.embeddings[0]
    assert e.source is not None and e.source.grid == (4, 6) and e.geometry_from == "config.json"
    assert ins.config is not None and ins.config["img_size"] == [32, 48]
    rep = vitresize.convert(tmp_path / "src", tmp_path / "out", img_size="48x64")
    assert rep.plan.models[0].target.grid == (6, 8)
    cls = transformers.ViTForImageClassification
    _, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["mismatched_keys"] and not info["missing_keys"]


def test_hf_sharded_folder_rewrites_the_affected_shard_and_index(tmp_path: Path) -> None:
    src = FAM / "hf_vit_sharded"
    rep = vitresize.convert(src, tmp_path / "out", img_size=48)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 1
    assert "model.safetensors.index.json" in rep.rewritten and "config.json" in rep.rewritten
    assert any(s in rep.copied for s in shards)
    _model, info = transformers.ViTModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]


# ---------------------------------------------------------------- open_clip


@pytest.mark.parametrize("target", [0, 1, 2, 3])
def test_open_clip_native_matches_resize_pos_embed_and_loads_strict(target: int, tmp_path: Path) -> None:
    from open_clip.model import resize_pos_embed

    img, patch = TARGETS_8[target]
    out = tmp_path / "o.pth"
    rep = vitresize.convert(FAM / "open_clip.pth", out, **_kw(img, patch))
    assert rep.plan.models[0].embedding.family == "open_clip"
    got = torch.load(out, weights_only=True)
    before = torch.load(FAM / "open_clip.pth", weights_only=True)
    h, w = _hw(img)
    new = make_families.open_clip_model(image_size=(h, w) if h != w else h, patch_size=patch)  # type: ignore[arg-type]
    new.load_state_dict(got, strict=True)
    assert torch.equal(got["positional_embedding"], before["positional_embedding"])  # text table untouched
    ref = dict(before)  # resize_pos_embed: a square source, any target grid
    resize_pos_embed(ref, new)
    _close(got["visual.positional_embedding"], ref["visual.positional_embedding"])


# ---------------------------------------------------------------- DINOv2 hub


def _dinov2_hub(pos: torch.Tensor, w0: int, h0: int, offset: float, antialias: bool) -> torch.Tensor:
    """facebookresearch/dinov2 ``DinoVisionTransformer.interpolate_pos_encoding`` (Apache-2.0), for a
    square grid, as the oracle."""
    pos = pos.float()
    class_pos, patch_pos = pos[:, 0], pos[:, 1:]
    dim = pos.shape[-1]
    m = int(math.sqrt(patch_pos.shape[1]))
    kwargs: dict[str, Any] = {}
    if offset:
        kwargs["scale_factor"] = (float(w0 + offset) / m, float(h0 + offset) / m)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos = F.interpolate(
        patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **kwargs
    )
    patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos.unsqueeze(0), patch_pos), dim=1)


@pytest.mark.parametrize("file,offset,aa", [("dinov2_vits14.pth", 0.1, False), ("dinov2_vits14_reg4.pth", 0.0, True)])
@pytest.mark.parametrize("target", [0, 1, 2, 3])
def test_dinov2_native_matches_hub_code(file: str, offset: float, aa: bool, target: int, tmp_path: Path) -> None:
    img, patch = TARGETS_7[target]
    out = tmp_path / "o.safetensors"
    rep = vitresize.convert(FAM / file, out, **_kw(img, patch))
    assert rep.plan.models[0].embedding.family == "dinov2"
    before, got = torch.load(FAM / file, weights_only=True), load_file(out)
    h, w = _hw(img)
    # The hub code reads x as (B, C, "w", "h"): its w0 is the number of rows, h0 of columns.
    want = _dinov2_hub(before["pos_embed"], h // patch, w // patch, offset, aa)
    _close(got["pos_embed"], want)
    if patch != 7:
        k = resample_patch_embed(before["patch_embed.proj.weight"], [patch, patch])
        assert torch.equal(got["patch_embed.proj.weight"], k)
    if "register_tokens" in before:
        assert torch.equal(got["register_tokens"], before["register_tokens"])
    assert torch.equal(got["mask_token"], before["mask_token"])


def test_dinov2_method_timm_matches_timm(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    vitresize.convert(FAM / "dinov2_vits14.pth", out, img_size=42, method="timm")
    before = torch.load(FAM / "dinov2_vits14.pth", weights_only=True)
    want = resample_abs_pos_embed(before["pos_embed"], [6, 6], [4, 4], num_prefix_tokens=1)
    assert torch.equal(load_file(out)["pos_embed"], want)


# ---------------------------------------------------------------- JAX .npz


def _zoom_posemb(pos: np.ndarray[Any, Any], new: tuple[int, int], tok: int) -> np.ndarray[Any, Any]:
    """vit_jax ``load_pretrained`` / big_vision ``resample_posemb``: scipy.ndimage.zoom(order=1)."""
    head, grid = pos[:, :tok], pos[0, tok:]
    gs = int(math.sqrt(len(grid)))
    grid = grid.reshape(gs, gs, -1)
    grid = scipy_ndimage.zoom(grid, (new[0] / gs, new[1] / gs, 1), order=1)
    return np.concatenate([head, grid.reshape(1, new[0] * new[1], -1)], axis=1)


@pytest.mark.parametrize("file", list(make_families.NPZ))
@pytest.mark.parametrize("target", [0, 1, 2, 3])
def test_npz_native_matches_zoom_and_loads_into_timm(file: str, target: int, tmp_path: Path) -> None:
    layout, prefix = make_families.NPZ[file]
    img, patch = TARGETS_8[target]
    out = tmp_path / "o.npz"
    rep = vitresize.convert(FAM / file, out, **_kw(img, patch))
    assert rep.plan.models[0].embedding.family == layout
    src, got = np.load(FAM / file), np.load(out)
    pos_key = prefix + ("pos_embedding" if layout == "big_vision" else "Transformer/posembed_input/pos_embedding")
    kernel_key = prefix + "embedding/kernel"
    h, w = _hw(img)
    grid = (h // patch, w // patch)
    if h == w:
        want = _zoom_posemb(src[pos_key], grid, tok=0 if layout == "big_vision" else 1)
        np.testing.assert_allclose(got[pos_key], want, atol=1e-6, rtol=0)
    if patch != 8:  # FlexiViT PI-resize with a bilinear basis, in HWIO
        k = torch.from_numpy(src[kernel_key]).permute(3, 2, 0, 1)
        want_k = resample_patch_embed(k, [patch, patch], interpolation="bilinear", antialias=False)
        assert torch.equal(torch.from_numpy(got[kernel_key]), want_k.permute(2, 3, 1, 0))
    for k in src.files:  # every other array bit for bit
        if k not in (pos_key, kernel_key):
            assert got[k].tobytes() == src[k].tobytes() and got[k].dtype == src[k].dtype, k
    # timm's own .npz loader into a timm model of the new size: no resampling needed, shapes fit.
    model = make_families.timm_for_npz(layout, img_size=(h, w) if h != w else h, patch_size=patch)  # type: ignore[arg-type]
    model.load_pretrained(str(out))
    assert torch.equal(model.pos_embed.detach(), torch.from_numpy(got[pos_key]))


def test_npz_to_safetensors_keeps_keys_and_layout(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    vitresize.convert(FAM / "vit_jax.npz", out, img_size=48)
    got, src = load_file(out), np.load(FAM / "vit_jax.npz")
    assert set(got) == set(src.files)
    assert tuple(got["embedding/kernel"].shape) == src["embedding/kernel"].shape  # HWIO kept


def test_npz_raw_bfloat16_round_trips(tmp_path: Path) -> None:
    """big_vision stores bf16 as raw 2-byte arrays; they come back as raw 2-byte arrays, resampled in fp32."""
    src = np.load(FAM / "big_vision.npz")
    arrays = {}
    for k in src.files:
        a = torch.from_numpy(np.ascontiguousarray(src[k])).to(torch.bfloat16)
        arrays[k] = a.view(torch.int16).numpy().view("V2")
    bf = tmp_path / "bf16.npz"
    np.savez(bf, **arrays)  # type: ignore[arg-type]
    out = tmp_path / "o.npz"
    vitresize.convert(bf, out, img_size=48)
    got = np.load(out)
    assert got["params/pos_embedding"].dtype == np.dtype("V2")
    pos = torch.from_numpy(got["params/pos_embedding"].view(np.int16)).view(torch.bfloat16)
    assert pos.shape == (1, 36, 16)
    assert got["params/head/kernel"].tobytes() == arrays["params/head/kernel"].tobytes()


def test_inspect_names_family_and_config() -> None:
    ins = vitresize.inspect(FAM / "hf_clip")
    assert ins.family == "hf-clip" and ins.config is not None and ins.config["kind"] == "hf"
    assert ins.embeddings[0].pos_key == "vision_model.embeddings.position_embedding.weight"
    assert load_any  # fixture loader stays importable


# ---------------------------------------------------------------- timm hub folders


@pytest.mark.parametrize("img,safe", [(48, False), ((32, 48), False), (48, "both")])
def test_timm_hub_folder_config_is_updated_and_loads(img: Any, safe: Any, tmp_path: Path) -> None:
    """A folder saved by timm's ``save_for_hf``: ``pretrained_cfg.input_size`` and ``model_args`` get the new
    size, and ``timm.create_model("local-dir:...")`` builds the new-size model and loads it."""
    import timm
    from timm.models._hub import save_for_hf

    args = {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 10}
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **args)
    save_for_hf(model, tmp_path / "src", model_args=args, safe_serialization=safe)
    rep = vitresize.convert(tmp_path / "src", tmp_path / "out", img_size=img if isinstance(img, int) else "32x48")
    assert rep.plan.models[0].embedding.geometry_from == "config.json"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    h, w = _hw(img)
    assert cfg["pretrained_cfg"]["input_size"] == [3, h, w]
    new = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert tuple(new.patch_embed.img_size) == (h, w)
    if safe == "both":  # the safetensors copy is converted, the stale .bin copy left out and reported
        assert not (tmp_path / "out" / "pytorch_model.bin").exists()
        assert any("pytorch_model.bin" in x for x in rep.left_out)
        got = load_file(tmp_path / "out" / "model.safetensors")
    else:
        got = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    want = resample_abs_pos_embed(model.pos_embed.detach(), [h // 8, w // 8], [4, 4], num_prefix_tokens=1)
    assert torch.equal(got["pos_embed"], want) and torch.equal(new.pos_embed.detach(), want)


@pytest.mark.parametrize("file", list(make_families.NPZ))
def test_npz_method_timm_matches_timm(file: str, tmp_path: Path) -> None:
    layout, prefix = make_families.NPZ[file]
    out = tmp_path / "o.npz"
    vitresize.convert(FAM / file, out, img_size=48, method="timm")
    key = prefix + ("pos_embedding" if layout == "big_vision" else "Transformer/posembed_input/pos_embedding")
    src = torch.from_numpy(np.load(FAM / file)[key])
    want = resample_abs_pos_embed(src, [6, 6], [4, 4], num_prefix_tokens=0 if layout == "big_vision" else 1)
    assert torch.equal(torch.from_numpy(np.load(out)[key]), want)


def test_hf_sharded_bin_folder(tmp_path: Path) -> None:
    """``pytorch_model.bin.index.json`` + torch shards (huggingface_hub's own sharding): the shard holding
    the table is rewritten as a torch file, the others copied, the index and config updated."""
    from huggingface_hub import save_torch_state_dict

    model = make_families.hf_model("hf_vit_sharded")
    src = tmp_path / "src"
    src.mkdir()
    save_torch_state_dict(model.state_dict(), src, safe_serialization=False, max_shard_size="12KB")
    model.config.save_pretrained(src)
    shards = sorted(p.name for p in src.glob("pytorch_model-*.bin"))
    assert len(shards) > 1 and (src / "pytorch_model.bin.index.json").exists()
    rep = vitresize.convert(src, tmp_path / "out", img_size=48)
    assert rep.plan.src_format == "torch-sharded"
    assert "pytorch_model.bin.index.json" in rep.rewritten and "config.json" in rep.rewritten
    assert any(s in rep.copied for s in shards)
    out = tmp_path / "out"
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    got: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(index["weight_map"].values()):
        got.update(torch.load(out / name, weights_only=True))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    want = _hf_native("hf_vit_sharded", (48, 48))
    _close(got["embeddings.position_embeddings"], want)
    new = transformers.ViTModel(transformers.ViTConfig.from_pretrained(out))
    new.load_state_dict(got, strict=True)


def test_a_folder_to_a_file_name_is_a_usage_error(tmp_path: Path, run: Any) -> None:
    res = run("convert", FAM / "hf_vit", tmp_path / "out.safetensors", "--img-size", "48")
    assert res.exit_code == 2 and "converts to a folder" in res.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_npz_with_a_corrupt_member_is_refused(tmp_path: Path, run: Any) -> None:
    """A flipped byte in a member that is copied, not resampled: its CRC no longer matches."""
    import zipfile

    data = bytearray((FAM / "vit_jax.npz").read_bytes())
    with zipfile.ZipFile(FAM / "vit_jax.npz") as z:
        info = z.getinfo("embedding/kernel.npy")  # 12 kB: past what reading its header pulls in
    data[info.header_offset + 30 + len(info.filename) + 8000] ^= 0xFF
    src = tmp_path / "bad.npz"
    src.write_bytes(bytes(data))
    res = run("convert", src, tmp_path / "o.npz", "--img-size", "48")
    assert res.exit_code == 1 and res.stderr.count("Error:") == 1 and "corrupt" in res.stderr
    assert not (tmp_path / "o.npz").exists() and "Traceback" not in res.stderr


@pytest.mark.parametrize("dry", [False, True])
def test_npz_output_needs_npz_input(tmp_path: Path, run: Any, dry: bool) -> None:
    args = ["--dry-run"] if dry else []
    res = run("convert", FIXTURES / "timm_vit_cls.pth", tmp_path / "o.npz", "--img-size", "48", *args)
    assert res.exit_code == 2 and "needs a .npz input" in res.stderr
    assert not list(tmp_path.iterdir())
