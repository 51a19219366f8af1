"""Streaming never changes results: outputs equal a plain load-everything / resample / save reference."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, digest, fixture, load_any
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

import vitresize
from vitresize.formats.base import Segment
from vitresize.formats.safetensors import tensor_bytes
from vitresize.formats.torch_pickle import TorchCheckpoint

SOURCES = ["timm_vit_cls.pth", "timm_vit_cls.safetensors", "deit_distilled.pth", "timm_vit_legacy.pth"]


def _reference(sd: dict[str, Any], prefix_rows: int) -> OrderedDict[str, torch.Tensor]:
    """What a user's script does: everything in memory, timm's functions, 4x4/8 -> 6x6/4 (img 24)."""
    out = OrderedDict((k, v) for k, v in sd.items() if isinstance(v, torch.Tensor))
    pos = out["pos_embed"].float()
    pos = resample_abs_pos_embed(pos, [6, 6], [4, 4], num_prefix_tokens=prefix_rows)
    out["pos_embed"] = pos.to(sd["pos_embed"].dtype)
    w = out["patch_embed.proj.weight"]
    out["patch_embed.proj.weight"] = resample_patch_embed(w.float(), [4, 4]).to(w.dtype)
    return out


@pytest.mark.parametrize("name", SOURCES)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_streamed_output_equals_load_everything_reference(tmp_path: Path, name: str, suffix: str) -> None:
    src = load_any(fixture(name))
    sd = src.get("model", src)
    want = _reference(sd, prefix_rows=2 if "dist_token" in sd else 1)
    dst = tmp_path / f"o{suffix}"
    vitresize.convert(fixture(name), dst, img_size=24, patch=4)
    got = load_any(dst)
    got = got.get("model", got)
    assert list(got) == list(want)
    assert all(digest(got[k]) == digest(v) for k, v in want.items())
    if suffix == ".safetensors":  # the reference writer's bytes, tensor for tensor
        ref = tmp_path / "ref.safetensors"
        save_file(want, str(ref))
        assert all(digest(t) == digest(load_any(ref)[k]) for k, t in got.items())


@pytest.mark.parametrize("name", ["deit_distilled.pth", "timm_vit_cls.pth", "timm_vit_ddp.pth"])
def test_zip_pth_tensors_are_found_as_file_ranges(name: str) -> None:
    """Every tensor of a zip .pth is copied file-to-file, and the ranges hold exactly its bytes."""
    data = fixture(name).read_bytes()
    ckpt = TorchCheckpoint(fixture(name), zip_format=True)
    for sd, infos in ckpt.state_dicts.items():
        ranges = ckpt.file_ranges(sd)
        assert set(ranges) == set(infos)
        for key, (offset, n) in ranges.items():
            assert data[offset : offset + n] == bytes(tensor_bytes(ckpt.tensor(sd, key)))


def test_legacy_pickles_have_no_file_ranges() -> None:
    ckpt = TorchCheckpoint(fixture("timm_vit_legacy.pth"), zip_format=False)
    assert ckpt.file_ranges("") == {}


def test_views_and_shared_storage_are_copied_right(tmp_path: Path) -> None:
    """Tensors that are views into one storage, or non-contiguous, still come out exactly."""
    sd = load_any(fixture("timm_vit_cls.pth"))
    big = torch.arange(64, dtype=torch.float32)
    sd["extra.view"] = big[8:24]
    sd["extra.strided"] = big.reshape(8, 8).t()
    sd["extra.whole"] = big
    src = tmp_path / "views.pth"
    torch.save(sd, src)
    for suffix in (".safetensors", ".pth"):
        dst = tmp_path / f"o{suffix}"
        vitresize.convert(src, dst, img_size=48, verify=True)
        out = load_any(dst)
        for k in ("extra.view", "extra.strided", "extra.whole"):
            assert torch.equal(out[k], sd[k]), (suffix, k)


def test_copy_falls_back_to_buffered_io(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where copy_file_range is refused (other file systems), the buffered path gives the same file."""
    import errno

    dst_fast = tmp_path / "fast.safetensors"
    vitresize.convert(fixture("timm_vit_reg4.safetensors"), dst_fast, img_size=48)

    def refuse(*a: Any, **k: Any) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    dst_slow = tmp_path / "slow.safetensors"
    vitresize.convert(fixture("timm_vit_reg4.safetensors"), dst_slow, img_size=48)
    assert dst_fast.read_bytes() == dst_slow.read_bytes()


def test_a_copy_error_is_not_mistaken_for_unsupported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import errno

    def full(*a: Any, **k: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    dst = tmp_path / "o.safetensors"
    with pytest.raises(vitresize.VitresizeError, match="No space left on device"):
        vitresize.convert(fixture("timm_vit_reg4.safetensors"), dst, img_size=48)
    assert not dst.exists()


def test_page_release_drops_resident_pages(tmp_path: Path) -> None:
    """After release(), a mapped file's pages no longer count in this process's RSS (Linux)."""
    if not Path("/proc/self/smaps_rollup").exists():
        pytest.skip("needs Linux /proc")
    code = """
import mmap, sys
from pathlib import Path
from vitresize.formats._pages import release

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024

path = Path(sys.argv[1])
with open(path, "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
base = rss()
total = sum(m[i] for i in range(0, len(m), 4096))  # touch every page
touched = rss()
release(path)
print(touched - base, rss() - base)
"""
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(64 * 1024 * 1024))
    res = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    grown, after = (int(x) for x in res.stdout.split())
    assert grown >= 60 and after <= 4, res.stdout


def test_a_sparse_file_bigger_than_memory_converts(tmp_path: Path) -> None:
    """A safetensors file twice the size of RAM (sparse: only the embeddings are real) converts: nothing maps
    the whole file privately (the kernel refuses that commit charge), and holes are copied as holes."""
    import json
    import struct

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    filler = 2 * ram // 4
    entries = [
        ("cls_token", [1, 1, 16]),
        ("pos_embed", [1, 17, 16]),
        ("patch_embed.proj.weight", [16, 3, 8, 8]),
        ("filler", [filler]),
    ]
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in entries:
        n = 4 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    src = tmp_path / "huge.safetensors"
    with open(src, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.write(torch.randn(1 * 16 + 17 * 16 + 16 * 3 * 8 * 8).numpy().tobytes())
        f.truncate(8 + len(raw) + offset)
    if src.stat().st_blocks * 512 > 64 * 2**20:
        pytest.skip("this file system does not keep sparse files sparse")
    dst = tmp_path / "out.safetensors"
    vitresize.convert(src, dst, img_size=48)
    assert dst.stat().st_size > ram and dst.stat().st_blocks * 512 < 64 * 2**20
    with open(dst, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        assert json.loads(f.read(n))["pos_embed"]["shape"] == [1, 37, 16]


@pytest.mark.parametrize("platform", ["linux", "other"])
def test_copier_process_or_thread_same_file_and_progress(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, platform: str
) -> None:
    """The copy runs in a forked child on Linux, a thread elsewhere: same bytes, and progress adds up."""
    import vitresize.formats._copy as copy_engine

    ref = tmp_path / "ref.safetensors"
    vitresize.convert(fixture("timm_vit_reg4.safetensors"), ref, img_size=48)
    if platform != "linux":
        monkeypatch.setattr(copy_engine, "_FORK_COPIES", False)
    ticks: list[tuple[int, int]] = []
    dst = tmp_path / "o.safetensors"
    vitresize.convert(
        fixture("timm_vit_reg4.safetensors"), dst, img_size=48, progress=lambda d, t: ticks.append((d, t))
    )
    assert dst.read_bytes() == ref.read_bytes()
    assert ticks and ticks[-1][0] == dst.stat().st_size


def test_a_failing_producer_stops_the_copy_process(tmp_path: Path) -> None:
    """When a tensor cannot be produced, the copying child is killed and reaped, and the error surfaces."""
    import vitresize.formats.safetensors as st

    src = fixture("timm_vit_reg4.safetensors")
    _, entries, _ = st.read_header(src)

    def boom() -> torch.Tensor:
        raise RuntimeError("cannot produce")

    segments = [
        Segment(k, "float32", e.shape, e.end - e.start, load=boom, source=(src, e.start)) for k, e in entries.items()
    ]
    segments.append(Segment("extra", "float32", (2,), 8, load=boom))
    with pytest.raises(RuntimeError, match="cannot produce"):
        st.write_safetensors(tmp_path / "o.safetensors", segments, {})
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # no child left behind, not even a zombie


def test_a_refused_fork_copies_in_a_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import errno

    ref = tmp_path / "ref.safetensors"
    vitresize.convert(fixture("timm_vit_cls.pth"), ref, img_size=48)

    def no_fork() -> int:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    dst = tmp_path / "o.safetensors"
    vitresize.convert(fixture("timm_vit_cls.pth"), dst, img_size=48)
    assert dst.read_bytes() == ref.read_bytes()
