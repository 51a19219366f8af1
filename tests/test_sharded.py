"""Sharded safetensors folders (written by huggingface_hub's own sharding): only the affected shards change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import make_fixtures
import pytest
import torch
from conftest import digest, file_digest, fixture, leftovers, load_any, spec
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

import vitresize


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    folder = tmp_path / "vit_sharded"
    folder.mkdir()
    sd = load_any(fixture("timm_vit_cls.safetensors"))
    save_torch_state_dict(sd, folder, max_shard_size="6KB")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 10}))
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return folder


def _merged(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_only_affected_shards_are_rewritten(run: Any, sharded: Path, tmp_path: Path) -> None:
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    affected = {index["weight_map"]["pos_embed"], index["weight_map"]["patch_embed.proj.weight"]}
    before = {p.name: file_digest(p) for p in sharded.iterdir()}
    dst = tmp_path / "vit_48"
    res = run("convert", sharded, dst, "--img-size", "72", "--patch", "12", "--json", "--verify")
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["dst_format"] == "folder" and rep["verified"]["identical"]
    assert set(rep["files"]["rewritten"]) == affected | {"model.safetensors.index.json"}
    shards = {p.name for p in sharded.glob("*.safetensors")}
    assert set(rep["files"]["copied"]) == (shards - affected) | {"config.json"}
    for name in shards - affected:  # copied byte for byte
        assert file_digest(dst / name) == before[name]
    assert {p.name: file_digest(p) for p in sharded.iterdir()} == before  # input untouched
    # The index still maps every key to the shard that holds it, with the new total size.
    new_index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert new_index["weight_map"] == index["weight_map"]
    merged = _merged(dst)
    assert new_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    # And the merged weights load strictly into timm's model at the new size.
    model = make_fixtures.build_model(spec("timm_vit_cls.safetensors"), img_size=72, patch_size=12)
    model.load_state_dict(merged, strict=True)
    src = _merged(sharded)
    assert all(
        digest(merged[k]) == digest(v) for k, v in src.items() if k not in ("pos_embed", "patch_embed.proj.weight")
    )
    assert leftovers(tmp_path) == []


def test_sharded_equals_single_file(sharded: Path, tmp_path: Path) -> None:
    vitresize.convert(sharded, tmp_path / "out", img_size=48)
    vitresize.convert(fixture("timm_vit_cls.safetensors"), tmp_path / "one.safetensors", img_size=48)
    one = load_any(tmp_path / "one.safetensors")
    merged = _merged(tmp_path / "out")
    assert set(one) == set(merged) and all(digest(one[k]) == digest(v) for k, v in merged.items())


def test_inspect_a_sharded_folder(run: Any, sharded: Path) -> None:
    res = run("inspect", sharded, "--json")
    assert res.exit_code == 0, res.stderr
    ins = json.loads(res.stdout)
    assert ins["format"] == "safetensors-sharded" and ins["models"][0]["grid"] == [4, 4]


def test_folder_output_refuses_existing_without_force_and_replaces_with_it(
    run: Any, sharded: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    res = run("convert", sharded, dst, "--img-size", "48")
    assert res.exit_code == 1 and "already exists" in res.stderr and (dst / "old.txt").exists()
    res = run("convert", sharded, dst, "--img-size", "48", "--force")
    assert res.exit_code == 0, res.stderr
    assert not (dst / "old.txt").exists() and (dst / "model.safetensors.index.json").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_folder_in_place_with_force(sharded: Path) -> None:
    vitresize.convert(sharded, sharded, img_size=48, force=True)
    assert _merged(sharded)["pos_embed"].shape == (1, 37, 16)


def test_failed_folder_write_leaves_nothing(monkeypatch: pytest.MonkeyPatch, sharded: Path, tmp_path: Path) -> None:
    import errno

    import vitresize.formats._copy as copy_engine

    def full(*a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(copy_engine, "write_all", full)
    dst = tmp_path / "out"
    with pytest.raises(vitresize.VitresizeError, match="No space left"):
        vitresize.convert(sharded, dst, img_size=48)
    assert not dst.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "model.safetensors.index.json").unlink(), "no *.safetensors.index.json"),
        (lambda f: (f / "model.safetensors.index.json").write_text("{"), "not a valid index"),
        (lambda f: next(f.glob("model-0000*.safetensors")).unlink(), "not a file"),
    ],
)
def test_broken_folders_get_one_error_line(run: Any, sharded: Path, damage: Any, message: str) -> None:
    damage(sharded)
    res = run("inspect", sharded)
    assert res.exit_code == 1 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_relative_folder_src_converts_next_to_itself(
    sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regular files of a folder given by a relative path are not mistaken for links out of it: the folder
    converts in place (DST spelt another way, with force), as it does given by its absolute path."""
    monkeypatch.chdir(sharded.parent)
    dst = Path("..") / sharded.parent.name / sharded.name
    rep = vitresize.convert(Path(sharded.name), dst, img_size=48, verify=True, force=True)
    assert rep.verified is not None and leftovers(tmp_path) == []
    assert vitresize.inspect(sharded).embeddings[0].pos_shape == (1, 37, 16)
