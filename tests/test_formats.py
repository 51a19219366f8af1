"""Formats and containers: dtypes, nesting, prefixes, metadata, atomic writes, golden bytes."""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import digest, file_digest, fixture, leftovers, load_any, spec
from make_fixtures import build_model
from safetensors import safe_open
from safetensors.torch import save_file

import vitresize
from vitresize.formats.base import Segment
from vitresize.formats.safetensors import write_safetensors


@pytest.mark.parametrize("name", ["timm_vit_bf16.safetensors", "timm_vit_fp16.pth"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_half_dtypes_are_kept(run: Any, tmp_path: Path, name: str, suffix: str) -> None:
    dst = tmp_path / f"out{suffix}"
    before = file_digest(fixture(name))
    res = run("convert", fixture(name), dst, "--img-size", "48", "--patch", "12")
    assert res.exit_code == 0, res.stderr
    assert file_digest(fixture(name)) == before
    src, out = load_any(fixture(name)), load_any(dst)
    dtype = src["pos_embed"].dtype
    assert {v.dtype for v in out.values() if v.is_floating_point()} == {dtype}
    for k, v in out.items():
        if k not in ("pos_embed", "patch_embed.proj.weight"):
            assert digest(v) == digest(src[k]), k
    # float32 compute, cast back: equals resampling the float32 values and rounding once.
    from timm.layers import resample_abs_pos_embed

    want = resample_abs_pos_embed(src["pos_embed"].float(), [4, 4], [4, 4], num_prefix_tokens=1).to(dtype)
    assert torch.equal(out["pos_embed"], want)
    assert torch.equal(out["pos_embed"][:, :1], src["pos_embed"][:, :1])


def test_ddp_prefixes_and_nesting_kept(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "out.pth"
    res = run("convert", fixture("timm_vit_ddp.pth"), dst, "--img-size", "48", "--json")
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["models"][0]["key_prefix"] == "module._orig_mod."
    assert rep["changes"][0]["key"] == "module._orig_mod.pos_embed"
    src, out = load_any(fixture("timm_vit_ddp.pth")), load_any(dst)
    assert list(out) == ["state_dict", "epoch"] and out["epoch"] == 7
    assert list(out["state_dict"]) == list(src["state_dict"])
    stripped = {k.removeprefix("module._orig_mod."): v for k, v in out["state_dict"].items()}
    build_model(spec("timm_vit_cls.pth"), img_size=48).load_state_dict(stripped, strict=True)


def test_legacy_pickle_reads(run: Any, tmp_path: Path) -> None:
    res = run("convert", fixture("timm_vit_legacy.pth"), tmp_path / "o.safetensors", "--img-size", "48", "-v")
    assert res.exit_code == 0, res.stderr
    assert "legacy" in res.stderr
    info = vitresize.inspect(fixture("timm_vit_legacy.pth"))
    assert info.format == "torch-legacy"


def test_format_sniffed_from_content_not_extension(tmp_path: Path) -> None:
    disguised = tmp_path / "weights.bin"
    disguised.write_bytes(fixture("timm_vit_cls.safetensors").read_bytes())
    assert vitresize.inspect(disguised).format == "safetensors"
    report = vitresize.convert(disguised, tmp_path / "o.pth", img_size=48)
    assert report.plan.src_format == "safetensors"
    assert load_any(tmp_path / "o.pth")["pos_embed"].shape == (1, 37, 16)


def test_safetensors_metadata_kept_and_provenance_added(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    save_file(load_any(fixture("timm_vit_cls.safetensors")), str(src), metadata={"format": "pt", "license": "mit"})
    dst = tmp_path / "dst.safetensors"
    vitresize.convert(src, dst, img_size="32x48", method="timm")
    with safe_open(str(dst), "pt") as f:
        meta = f.metadata()
    assert meta["license"] == "mit" and meta["format"] == "pt"
    assert meta["vitresize.old_grid"] == "4x4" and meta["vitresize.new_grid"] == "4x6"
    assert meta["vitresize.method"] == "timm" and meta["vitresize.version"] == vitresize.__version__
    # The recorded grid lets the next run read the non-square table without flags (25 rows = 1 + 4x6, not 5x5).
    info = vitresize.inspect(dst)
    assert info.embeddings[0].source is not None
    assert info.embeddings[0].source.grid == (4, 6) and info.embeddings[0].geometry_from == "metadata"
    # ...and a .pth output reports the metadata it cannot carry.
    rep = vitresize.convert(dst, tmp_path / "o.pth", img_size=64)
    assert any("metadata" in x for x in rep.left_out)


def test_safetensors_output_is_readable_by_safetensors(tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    vitresize.convert(fixture("deit_distilled.pth"), dst, img_size=48)
    with safe_open(str(dst), "pt") as f:
        assert f.get_tensor("pos_embed").shape == (1, 38, 16)


def test_golden_safetensors_bytes(tmp_path: Path) -> None:
    t = torch.tensor([[1.0, -2.0]], dtype=torch.float32)
    dst = tmp_path / "g.safetensors"
    segs = [
        Segment("a", "float32", (1, 2), 8, load=lambda: t),
        Segment("b", "bfloat16", (1,), 2, load=lambda: torch.tensor([1.5], dtype=torch.bfloat16)),
    ]
    n = write_safetensors(dst, segs, {"format": "pt"})
    header = (
        b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},'
        b'"b":{"dtype":"BF16","shape":[1],"data_offsets":[8,10]}}'
    )
    header += b" " * (-len(header) % 8)
    want = struct.pack("<Q", len(header)) + header + bytes.fromhex("0000803f000000c0c03f")
    assert dst.read_bytes() == want and n == len(want)


@pytest.mark.parametrize("name", ["timm_vit_cls.safetensors", "timm_vit_cls.pth"])
def test_src_equals_dst_with_force(tmp_path: Path, name: str) -> None:
    src = tmp_path / name
    src.write_bytes(fixture(name).read_bytes())
    vitresize.convert(src, src, img_size=48, force=True)
    out = load_any(src)
    assert out["pos_embed"].shape == (1, 37, 16)
    assert digest(out["blocks.0.attn.qkv.weight"]) == digest(load_any(fixture(name))["blocks.0.attn.qkv.weight"])
    assert leftovers(tmp_path) == []


def test_existing_dst_refused_and_untouched(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(b"keep me")
    res = run("convert", fixture("timm_vit_cls.pth"), dst, "--img-size", "48")
    assert res.exit_code == 1
    assert res.stderr.startswith("Error:") and "--force" in res.stderr
    assert dst.read_bytes() == b"keep me" and leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    """A write that fails at the OS level (ENOSPC) leaves no output and no temp file."""
    import vitresize.formats._copy as copy_engine
    import vitresize.formats.torch_pickle as tp

    def full(*_: Any, **__: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(copy_engine, "write_all", full)
    monkeypatch.setattr(tp, "save_container", full)
    dst = tmp_path / f"o{suffix}"
    with pytest.raises(vitresize.VitresizeError, match="No space left"):
        vitresize.convert(fixture("timm_vit_cls.pth"), dst, img_size=48)
    assert not dst.exists() and leftovers(tmp_path) == []


def test_dry_run_writes_nothing(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    res = run("convert", fixture("deit_distilled.pth"), dst, "--img-size", "48", "-n", "--json")
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["dry_run"] is True and rep["bytes_written"] == 0 and len(rep["changes"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_no_op_target_copies(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    res = run("convert", fixture("timm_vit_cls.pth"), dst, "--img-size", "32")
    assert res.exit_code == 0 and "nothing to resample" in res.stderr
    src, out = load_any(fixture("timm_vit_cls.pth")), load_any(dst)
    assert all(digest(out[k]) == digest(v) for k, v in src.items())


def test_safetensors_to_safetensors_copies_ranges(tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    rep = vitresize.convert(fixture("timm_vit_reg4.safetensors"), dst, img_size=48)
    src, out = load_any(fixture("timm_vit_reg4.safetensors")), load_any(dst)
    assert rep.passed_through == len(src) - 1
    assert all(digest(out[k]) == digest(v) for k, v in src.items() if k != "pos_embed")
    assert torch.equal(out["pos_embed"][:, :5], src["pos_embed"][:, :5])


def test_plan_api_reads_shapes_only() -> None:
    with vitresize.plan(fixture("timm_vit_cls.safetensors"), img_size=48, patch=4) as p:
        assert [(c.key, c.new_shape) for c in p.changes] == [
            ("pos_embed", (1, 1 + 12 * 12, 16)),
            ("patch_embed.proj.weight", (16, 3, 4, 4)),
        ]
        assert p.to_dict()["new_grid"] == [12, 12]


def test_a_tensor_named_metadata_cannot_go_to_safetensors(run: Any, tmp_path: Path) -> None:
    """safetensors reserves ``__metadata__``: one line naming the key, nothing written (a .pth still works)."""
    sd = load_any(fixture("timm_vit_cls.pth"))
    sd["__metadata__"] = torch.zeros(2)
    src = tmp_path / "meta.pth"
    torch.save(sd, src)
    res = run("convert", src, tmp_path / "o.safetensors", "--img-size", "48")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "'__metadata__'" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.pth"]
    assert run("convert", src, tmp_path / "o.pth", "--img-size", "48").exit_code == 0
