"""Block-congruent safetensors outputs, and what a copy-on-write file system does with them: on XFS with reflink
and on btrfs (loop-mounted; skipped without root, a loop device or the mkfs tool) the unchanged tensors are
cloned, not copied."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import fixture
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

import vitresize
from vitresize.formats import open_checkpoint
from vitresize.formats._copy import BLOCK
from vitresize.formats._fiemap import shared_bytes


def _offsets(path: Path) -> dict[str, int]:
    """Every tensor's absolute offset in a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return {k: 8 + n + v["data_offsets"][0] for k, v in header.items()}


def _largest_copied(src: Path) -> tuple[str, int]:
    """The largest tensor of ``src`` that lies as it is in the file, and where."""
    with open_checkpoint(src) as ckpt:
        segs = [s for sd in ckpt.state_dicts for s in ckpt.segments(sd) if s.source is not None]
    best = max(segs, key=lambda s: s.nbytes)
    assert best.source is not None
    return best.key, best.source[1]


@pytest.mark.parametrize("name", ["timm_vit_cls.safetensors", "timm_vit_cls.pth", "timm_vit_reg4.safetensors"])
def test_unchanged_tensors_land_block_congruent(tmp_path: Path, name: str) -> None:
    src, dst = fixture(name), tmp_path / "out.safetensors"
    vitresize.convert(src, dst, img_size=48)
    key, at = _largest_copied(src)
    assert _offsets(dst)[key] % BLOCK == at % BLOCK
    # the tensors keep their order (safetensors lists them by offset), and every reader takes the file
    ref = load_file(str(src)) if src.suffix == ".safetensors" else torch.load(src, weights_only=True)
    out = load_file(str(dst))
    assert list(out) == list(ref)
    assert set(load_numpy(str(dst))) == set(ref)
    with safe_open(str(dst), "pt") as f:
        assert f.get_tensor(key).equal(ref[key])
        assert f.metadata()["vitresize.new_grid"] == "6x6"
    assert _offsets(dst)[key] - 8 > 0 and (_offsets(dst)[key] - 8) % 8 == 0  # data stays 8-aligned


def test_shared_bytes_on_an_ordinary_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10000)
    assert shared_bytes(path) in (0, None)  # tmpfs may not answer FIEMAP


MKFS = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q"]}
"""How each copy-on-write file system is made (XFS needs reflink on; btrfs always shares)."""


@contextlib.contextmanager
def _cow(tmp_path: Path, fs: str, size: int = 400 << 20) -> Iterator[Path]:
    """A loop-mounted copy-on-write file system (a sparse image of ``size`` bytes), or a skip saying why there is
    none."""
    if os.geteuid() != 0:
        pytest.skip(f"mounting a {fs} image needs root")
    for tool in (MKFS[fs][0], "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install xfsprogs btrfs-progs; make install-cow-tools)")
    image, mnt = tmp_path / f"{fs}.img", tmp_path / "mnt"
    with image.open("wb") as f:
        f.truncate(size)  # sparse; XFS wants at least 300 MB, btrfs 114 MB
    mnt.mkdir()
    made = subprocess.run([*MKFS[fs], str(image)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"{' '.join(MKFS[fs])} failed: {made.stderr.strip()[:200]}")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot loop-mount a {fs} image here: {mounted.stderr.strip()[:200]}")
    try:
        yield mnt
    finally:
        gc.collect()  # tensors mapped from files on it (safetensors' loaders mmap) would keep it busy
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(mnt)], check=False)  # detached now, released when unused


def _big_vit(path: Path) -> int:
    """A tiny ViT with one 32 MiB extra tensor (what makes a checkpoint big); the tensor's bytes."""
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, num_classes=10)  # fmt: skip
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["blocks.0.big"] = torch.randn(8, 1024, 1024)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return sd["blocks.0.big"].numel() * 4


@pytest.mark.parametrize("fs", ["xfs", "btrfs"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_cow_file_system_clones_the_unchanged_bytes(tmp_path: Path, suffix: str, fs: str) -> None:
    with _cow(tmp_path, fs) as mnt:
        src = mnt / f"src{suffix}"
        big = _big_vit(src)
        rep = vitresize.convert(src, mnt / "dst.safetensors", img_size=64)
        cloned = shared_bytes(mnt / "dst.safetensors")
        assert cloned is not None and cloned >= big - 2 * BLOCK, (cloned, big)
        assert rep.cloned_bytes == cloned
        # the same conversion written off XFS holds the same tensors and metadata
        shutil.copy(src, tmp_path / f"src{suffix}")
        vitresize.convert(tmp_path / f"src{suffix}", tmp_path / "dst.safetensors", img_size=64)
        a, b = load_file(str(mnt / "dst.safetensors")), load_file(str(tmp_path / "dst.safetensors"))
        assert list(a) == list(b) and all(a[k].equal(b[k]) for k in a)
        with (
            safe_open(str(mnt / "dst.safetensors"), "pt") as f,
            safe_open(str(tmp_path / "dst.safetensors"), "pt") as g,
        ):
            assert f.metadata() == g.metadata()


def _big_npz(path: Path) -> int:
    """The vit_jax fixture with one 4 MiB extra kernel; its bytes."""
    import numpy as np

    arrays = dict(np.load(fixture("families/vit_jax.npz")))
    arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_9/kernel"] = np.random.default_rng(0).standard_normal(
        (1024, 1024), dtype=np.float32
    )
    np.savez(path, **arrays)
    return 4 << 20


def _same_pth(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and a.equal(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same_pth(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("fs", ["xfs", "btrfs"])
@pytest.mark.parametrize("suffix", [".pth", ".npz"])
def test_cow_file_system_clones_zip_outputs(tmp_path: Path, suffix: str, fs: str) -> None:
    """.pth -> .pth and .npz -> .npz: the large unchanged members are cloned; the output reads as the one
    written off the copy-on-write file system (torch.load with and without mmap, numpy.load)."""
    import filecmp

    import numpy as np

    with _cow(tmp_path, fs) as mnt:
        src, dst, img = mnt / f"src{suffix}", mnt / f"dst{suffix}", 64
        if suffix == ".npz":
            big, img = _big_npz(src), 48
        else:
            big = _big_vit(src)
            torch.save({"model": torch.load(src, weights_only=True), "epoch": 3}, src)
        rep = vitresize.convert(src, dst, img_size=img)
        cloned = shared_bytes(dst)
        assert cloned is not None and cloned >= big - 2 * BLOCK, (cloned, big)
        assert rep.cloned_bytes == cloned
        shutil.copy(src, tmp_path / src.name)
        vitresize.convert(tmp_path / src.name, tmp_path / dst.name, img_size=img)
        assert filecmp.cmp(dst, tmp_path / dst.name, shallow=False)  # byte for byte the output made off XFS
        if suffix == ".npz":
            with np.load(dst) as a, np.load(tmp_path / dst.name) as b:
                assert list(a) == list(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
        else:
            ref = torch.load(tmp_path / dst.name, weights_only=True)
            for mmap in (False, True):
                assert _same_pth(torch.load(dst, weights_only=True, mmap=mmap), ref)


@pytest.mark.parametrize("fs", ["xfs", "btrfs"])
def test_mappings_of_a_file_are_found(tmp_path: Path, fs: str) -> None:
    """btrfs lists a mapped file under another device number than ``stat`` gives: the mapping is still found
    (the .pth writer locates storages by it, and the page release drops what reading touched)."""
    import mmap

    from vitresize.formats._pages import file_mappings, release

    with _cow(tmp_path, fs) as mnt:
        path = mnt / "f"
        path.write_bytes(b"x" * (1 << 20))
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert m[123] == ord("x")
            assert [(end - start, offset) for start, end, offset in file_mappings(path)] == [(1 << 20, 0)]
            assert release(path) == 1 << 20


@pytest.mark.slow
def test_cow_file_system_clones_a_sharded_folder(tmp_path: Path) -> None:
    """A sharded transformers folder: the shards without the position table are cloned whole, the one holding
    it is rewritten with its other tensors cloned; the output loads into the model at the new size."""
    import transformers

    with _cow(tmp_path, "xfs") as mnt:
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=1024)  # fmt: skip
        transformers.ViTModel(config).save_pretrained(mnt / "src", max_shard_size="2MB")
        shards = sorted((mnt / "src").glob("*.safetensors"))
        assert len(shards) > 2
        rep = vitresize.convert(mnt / "src", mnt / "dst", img_size=64)
        total = sum(p.stat().st_size for p in shards)
        assert rep.cloned_bytes is not None and rep.cloned_bytes >= total - 4 * (1 << 20) // 4 - 8 * BLOCK * len(shards)
        model = transformers.ViTModel.from_pretrained(mnt / "dst")
        assert model.config.image_size == 64


def _write_multi_gb(path: Path, big: int) -> None:
    """A tiny ViT's tensors and one ``big``-byte uint8 tensor of real (not sparse) bytes, as a safetensors file
    written directly (the tensor is never in memory: a 1 MiB random pattern repeated, its last MiB different)."""
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, num_classes=10)  # fmt: skip
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    header: dict[str, object] = {}
    at = 0
    for k, v in sd.items():
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [at, at + v.numel() * 4]}
        at += v.numel() * 4
    header["blocks.0.big"] = {"dtype": "U8", "shape": [big], "data_offsets": [at, at + big]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    pattern = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for v in sd.values():
            f.write(v.numpy().tobytes())
        for _ in range(big // len(pattern) - 1):
            f.write(pattern)
        f.write(os.urandom(big - (big // len(pattern) - 1) * len(pattern)))


@pytest.mark.slow
def test_cow_multi_gb_file(tmp_path: Path) -> None:
    """A 2.2 GB checkpoint of real bytes (past a 2 GiB copy_file_range call) on XFS: the output clones all but
    the changed table, and is byte for byte the output written on the machine's own file system."""
    import filecmp

    big = (2 << 30) + (200 << 20) + 12_345
    with _cow(tmp_path, "xfs", size=6 << 30) as mnt:
        src = mnt / "src.safetensors"
        _write_multi_gb(src, big)
        rep = vitresize.convert(src, mnt / "dst.safetensors", img_size=64)
        assert rep.cloned_bytes is not None and rep.cloned_bytes >= big - 2 * BLOCK, rep.cloned_bytes
        local = tmp_path / "local"
        local.mkdir()
        shutil.copyfile(src, local / "src.safetensors")
        vitresize.convert(local / "src.safetensors", local / "dst.safetensors", img_size=64)
        assert filecmp.cmp(mnt / "dst.safetensors", local / "dst.safetensors", shallow=False)
        with safe_open(str(mnt / "dst.safetensors"), "pt") as f, safe_open(str(src), "pt") as g:
            a, b = f.get_slice("blocks.0.big"), g.get_slice("blocks.0.big")
            assert a[big - 4096 :].equal(b[big - 4096 :]) and a[:4096].equal(b[:4096])
            assert f.get_tensor("pos_embed").shape == (1, 65, 32)
        (local / "src.safetensors").unlink()
