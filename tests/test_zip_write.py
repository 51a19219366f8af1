"""The block-congruent zip writer (``formats/_zip_write.py``) and the ``.npz`` and ``.pth`` outputs written with it:
every reader (zipfile, unzip, NumPy, torch's miniz, vitresize's own index) takes the files, large members copied
from an input land congruent with their source modulo 4096, and the outputs hold what the previous writers
(``zipfile`` for .npz, ``torch.save`` for .pth) wrote."""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
import zlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FIXTURES, digest, fixture
from safetensors.torch import load_file

import vitresize
from vitresize.errors import CheckpointFormatError, InternalError
from vitresize.formats import _torch_zip, _zip_write
from vitresize.formats._copy import BLOCK
from vitresize.formats._torch_zip import save_zip
from vitresize.formats._zip_index import check_zip, data_offset, read_zip_index
from vitresize.formats._zip_write import CLONE_MIN, DEFLATED, STORED, Member, write_zip
from vitresize.formats.npz import NpzCheckpoint, write_npz

FAM = FIXTURES / "families"
GIB4 = 1 << 32


# ---------------------------------------------------------------- helpers


def _offsets(path: Path) -> dict[str, int]:
    """Every member's data offset, by name."""
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        return {i.filename: data_offset(f, i) for i in z.infolist()}


def _raw(path: Path, name: str) -> bytes:
    """A member's stored bytes (compressed as stored), read by offset."""
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        info = z.getinfo(name)
        f.seek(data_offset(f, info))
        return f.read(info.compress_size)


def _unpadded(path: Path, name: str) -> bool:
    """Whether a member's local header has no extra field (its data follows its name)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    return _offsets(path)[name] == info.header_offset + 30 + len(name.encode())


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _unzip_ok(path: Path) -> None:
    """Info-ZIP's unzip tests the archive too (where it is installed)."""
    if shutil.which("unzip"):
        res = subprocess.run(["unzip", "-tqq", str(path)], capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stdout + res.stderr


def _times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _square(mat: list[int]) -> list[int]:
    return [_times(mat, mat[n]) for n in range(32)]


def crc32_zeros(n: int, crc: int = 0) -> int:
    """``zlib.crc32(bytes(n), crc)`` in O(log n): the CRC register times x^(8n) mod P (zlib's crc32_combine)."""
    op = [0xEDB88320] + [1 << i for i in range(31)]  # one zero bit
    for _ in range(3):
        op = _square(op)  # one zero byte
    reg = crc ^ 0xFFFFFFFF
    while n:
        if n & 1:
            reg = _times(op, reg)
        n >>= 1
        if n:
            op = _square(op)
    return reg ^ 0xFFFFFFFF


@pytest.mark.parametrize("n", [0, 1, 7, 4096, 1_000_003])
@pytest.mark.parametrize("crc", [0, 0x12345678])
def test_crc32_zeros_matches_zlib(n: int, crc: int) -> None:
    assert crc32_zeros(n, crc) == zlib.crc32(bytes(n), crc)


# ---------------------------------------------------------------- 1. write_zip


def _source(tmp_path: Path, pieces: list[tuple[int, bytes]], size: int) -> Path:
    """A file of ``size`` random-ish bytes with ``pieces`` (offset, bytes) written in."""
    path = tmp_path / "src.bin"
    rng = np.random.default_rng(0)
    buf = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    for at, data in pieces:
        buf[at : at + len(data)] = data
    path.write_bytes(bytes(buf))
    return path


@pytest.mark.parametrize("shift", [0, 777])
def test_write_zip_mixed_members(tmp_path: Path, shift: int) -> None:
    """Members from memory, from a source range (stored, CRC computed or given) and raw deflated copies, in one
    archive: every reader takes it, every member reads back; large copies land congruent with their source (the
    shift moves them so that the padding needed takes every value, 1 to 3 bytes included), small copies are not
    padded, ``align=64`` members start 64-aligned."""
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, CLONE_MIN + 1000, dtype=np.uint8).tobytes()
    exact = rng.integers(0, 256, CLONE_MIN, dtype=np.uint8).tobytes()  # the threshold itself
    small = b"small member bytes" * 10
    text = b"".join(b"line %d of a compressible member\n" % i for i in range(40_000))
    zipped = _deflate(text)
    assert len(zipped) >= CLONE_MIN
    tiny_text = b"tiny deflated" * 5
    tiny_zipped = _deflate(tiny_text)
    at_big, at_exact, at_small, at_zip, at_tiny = 8192 + 100 + shift, 200_000 + shift, 300_001, 310_000 + shift, 900
    src = _source(
        tmp_path,
        [(at_big, big), (at_exact, exact), (at_small, small), (at_zip, zipped), (at_tiny, tiny_zipped)],
        at_zip + len(zipped) + 5000,
    )
    memory = b"in memory" * 50
    mem_zipped = _deflate(memory)
    members = [
        Member("first/in memory.bin", len(memory), data=memory),
        Member("big.bin", len(big), source=(src, at_big)),  # CRC computed by the writer
        Member("naïve/データ.bin", len(small), source=(src, at_small), crc=zlib.crc32(small)),
        Member("aligned.bin", 3, data=memoryview(b"abc"), align=64),
        Member("exact.bin", len(exact), source=(src, at_exact), crc=zlib.crc32(exact), verify=True),
        Member("small-aligned.bin", len(small), source=(src, at_small), align=64),
        Member(
            "zipped.txt",
            len(text),
            source=(src, at_zip),
            stored_size=len(zipped),
            compress_type=DEFLATED,
            crc=zlib.crc32(text),
            verify=True,
        ),
        Member(
            "tiny.txt",
            len(tiny_text),
            source=(src, at_tiny),
            stored_size=len(tiny_zipped),
            compress_type=DEFLATED,
            crc=zlib.crc32(tiny_text),
        ),
        Member(
            "mem.txt",
            len(memory),
            data=mem_zipped,
            stored_size=len(mem_zipped),
            compress_type=DEFLATED,
            crc=zlib.crc32(memory),
        ),
        Member("empty-memory", 0, data=b"", align=64),
        Member("empty-source", 0, source=(src, 5)),
        Member("último", 5, data=b"12345", date_time=(2024, 2, 29, 13, 14, 16), external_attr=0o644 << 16),
    ]
    dst = tmp_path / "out.zip"
    size = write_zip(dst, members)
    assert size == dst.stat().st_size
    want = {
        "first/in memory.bin": memory,
        "big.bin": big,
        "naïve/データ.bin": small,
        "aligned.bin": b"abc",
        "exact.bin": exact,
        "small-aligned.bin": small,
        "zipped.txt": text,
        "tiny.txt": tiny_text,
        "mem.txt": memory,
        "empty-memory": b"",
        "empty-source": b"",
        "último": b"12345",
    }
    with zipfile.ZipFile(dst) as z:
        assert z.testzip() is None
        assert [i.filename for i in z.infolist()] == list(want)  # in order, non-ASCII names decoded
        for name, data in want.items():
            assert z.read(name) == data, name
        infos = {i.filename: i for i in z.infolist()}
    assert infos["zipped.txt"].compress_type == DEFLATED and infos["mem.txt"].compress_type == DEFLATED
    assert infos["big.bin"].compress_type == STORED
    assert infos["último"].date_time == (2024, 2, 29, 13, 14, 16) and infos["último"].external_attr == 0o644 << 16
    assert _raw(dst, "zipped.txt") == zipped  # copied as stored, not recompressed
    off = _offsets(dst)
    for name, at in (("big.bin", at_big), ("exact.bin", at_exact), ("zipped.txt", at_zip)):
        assert off[name] % BLOCK == at % BLOCK, name
        assert off[name] - 4096 - 60 <= infos[name].header_offset  # at most a block of padding
    for name in ("naïve/データ.bin", "tiny.txt", "first/in memory.bin", "mem.txt", "empty-source", "último"):
        assert _unpadded(dst, name), name
    for name in ("aligned.bin", "small-aligned.bin", "empty-memory"):
        assert off[name] % 64 == 0, name
    _unzip_ok(dst)


@pytest.mark.parametrize("gap", [0, 1, 2, 3, 4, 5, 4095])
def test_write_zip_padding_edges(tmp_path: Path, gap: int) -> None:
    """The filler extra field needs 4 bytes: a gap of 1 to 3 bytes takes a block (or ``align``) more."""
    payload = bytes(range(256)) * (CLONE_MIN // 256)
    first = Member("first", 10, data=b"0123456789")
    head = 30 + len("first") + 10  # where the second member's header starts
    fixed = head + 30 + len("big")  # where its data would start unpadded
    at = 3 * BLOCK + (fixed + gap) % BLOCK
    src = _source(tmp_path, [(at, payload)], at + len(payload))
    aligned = Member("al", 3, data=b"abc", align=64)
    padding = gap + BLOCK if 0 < gap < 4 else gap
    end = fixed + padding + len(payload)  # where "big" ends
    short = gap % 64  # how far "al" would start short of a multiple of 64, unpadded
    name_len = (-short - end - 30 - 30 - 2) % 64 or 64  # "pre" (empty, unpadded) then "al"
    pre = Member("p" * name_len, 0, data=b"")
    dst = tmp_path / "pad.zip"
    write_zip(dst, [first, Member("big", len(payload), source=(src, at)), pre, aligned])
    with zipfile.ZipFile(dst) as z:
        assert z.testzip() is None and z.read("big") == payload and z.read("al") == b"abc"
        infos = {i.filename: i for i in z.infolist()}
    off = _offsets(dst)
    assert infos["big"].header_offset == head and off["big"] % BLOCK == at % BLOCK
    assert off["big"] - fixed == padding
    al_fixed = infos["al"].header_offset + 30 + 2
    assert (-al_fixed) % 64 == short
    assert off["al"] % 64 == 0 and off["al"] - al_fixed == (short + 64 if 0 < short < 4 else short)
    _unzip_ok(dst)


def test_write_zip_read_by_torch_miniz(tmp_path: Path) -> None:
    """torch's own zip reader (miniz) finds every record and the same data offsets through padded headers."""
    payload = np.random.default_rng(2).integers(0, 256, CLONE_MIN * 2, dtype=np.uint8).tobytes()
    src = _source(tmp_path, [(12_344, payload)], 12_344 + len(payload) + 10)
    members = [
        Member("arc/data.pkl", 5, data=b"12345", align=64),
        Member("arc/data/0", len(payload), source=(src, 12_344), align=64),
        Member("arc/data/1", 7, data=b"seven!!", align=64),
        Member("arc/version", 2, data=b"3\n"),
    ]
    dst = tmp_path / "t.zip"
    write_zip(dst, members)
    reader = torch._C.PyTorchFileReader(str(dst))
    off = _offsets(dst)
    assert off["arc/data/0"] % BLOCK == 12_344 % BLOCK
    for m in members:
        name = m.name.removeprefix("arc/")
        assert reader.get_record(name) == (m.data if m.data is not None else payload), name
        assert reader.get_record_offset(name) == off[m.name], name  # type: ignore[attr-defined]


def test_write_zip_refuses_a_member_that_fails_its_crc(tmp_path: Path) -> None:
    good = bytes(range(256)) * 300
    zipped = _deflate(good)
    src = _source(tmp_path, [(100, good), (200_000, zipped)], 200_000 + len(zipped))
    bad = zlib.crc32(good) ^ 1
    stored = Member("a", len(good), source=(src, 100), crc=bad, verify=True)
    deflated = Member(
        "b", len(good), source=(src, 200_000), stored_size=len(zipped), compress_type=DEFLATED, crc=bad, verify=True
    )
    for m in (stored, deflated):
        with pytest.raises(CheckpointFormatError, match="CRC"):
            write_zip(tmp_path / "out.zip", [m])
    # without verify, the CRC given is trusted (the source's own directory vouches for it)
    write_zip(tmp_path / "trusted.zip", [Member("a", len(good), source=(src, 100), crc=bad)])
    with zipfile.ZipFile(tmp_path / "trusted.zip") as z:
        assert z.testzip() == "a"


def test_write_zip_refuses_bad_sources(tmp_path: Path) -> None:
    """A source cut short, and a deflated member inflating past (or short of) its declared size."""
    data = b"x" * 1000
    src = _source(tmp_path, [(0, _deflate(data))], 2000)
    zipped = len(_deflate(data))
    with pytest.raises(CheckpointFormatError):  # the range runs past the end of the file
        write_zip(tmp_path / "a.zip", [Member("a", 5000, source=(src, 0))])
    with pytest.raises(CheckpointFormatError, match="inflates past"):
        write_zip(tmp_path / "b.zip", [Member("b", 10, None, (src, 0), zipped, DEFLATED, crc=0, verify=True)])
    with pytest.raises(CheckpointFormatError, match="holds 1000 bytes"):
        write_zip(tmp_path / "c.zip", [Member("c", 2000, None, (src, 0), zipped, DEFLATED, crc=0, verify=True)])


def test_write_zip_refuses_inconsistent_members(tmp_path: Path) -> None:
    src = _source(tmp_path, [], 100)
    for m in (
        Member("short", 10, data=b"123"),
        Member("both", 3, data=b"123", source=(src, 0)),
        Member("neither", 3),
        Member("deflated without crc", 3, data=b"123", compress_type=DEFLATED),
    ):
        with pytest.raises(InternalError):
            write_zip(tmp_path / "out.zip", [m])


def test_write_zip_bounds_inflation_of_a_crafted_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deflated member whose first chunk inflates to exactly one byte over its declared size: the writer must
    refuse it without ever inflating more than size+1 bytes (the chunk is made small to build it cheaply; at
    the real 16 MiB chunk a crafted file does the same)."""
    size = 1000
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = c.compress(b"a" * (size + 1)) + c.flush(zlib.Z_FULL_FLUSH)
    raw = head + c.compress(bytes(2_000_000)) + c.flush()
    src = tmp_path / "bomb.bin"
    src.write_bytes(raw)
    monkeypatch.setattr(_zip_write, "_CRC_CHUNK", len(head))
    produced: list[int] = []
    real = zlib.decompressobj

    class Spy:
        def __init__(self, *args: Any) -> None:
            self.inner = real(*args)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            out = self.inner.decompress(data, max_length)
            produced.append(len(out))
            return out

        @property
        def unconsumed_tail(self) -> bytes:
            return self.inner.unconsumed_tail

    monkeypatch.setattr(zlib, "decompressobj", Spy)
    member = Member("bomb", size, None, (src, 0), len(raw), DEFLATED, crc=0, verify=True)
    try:
        with pytest.raises(CheckpointFormatError):
            write_zip(tmp_path / "out.zip", [member])
    finally:
        assert sum(produced) <= size + 1


# ---------------------------------------------------------------- 2. ZIP64


BIG = GIB4 + 100


def _sparse(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> Path:
    with open(path, "wb") as f:
        for at, data in pieces:
            f.seek(at)
            f.write(data)
        f.truncate(size)
    return path


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@cache
def _zeros_crc() -> int:
    return crc32_zeros(BIG)


@pytest.mark.slow
def test_zip64_member_over_4gib_from_a_sparse_source(tmp_path: Path) -> None:
    """A stored member of 4 GiB + 100 bytes of zeros (a hole) and small members after it, past 4 GiB: zipfile,
    unzip and torch's miniz read the archive, the holes stay holes."""
    at_big = 3 * BLOCK + 123
    at_small = at_big + BIG + 37
    small = b"after the big one" * 3
    src = _sparse(tmp_path / "src.bin", at_small + len(small) + 10, [(at_small, small)])
    members = [
        Member("arc/big", BIG, source=(src, at_big), crc=_zeros_crc()),
        Member("arc/small", len(small), source=(src, at_small)),  # CRC computed by the writer
        Member("arc/version", 2, data=b"3\n", align=64),
    ]
    dst = tmp_path / "big.zip"
    write_zip(dst, members)
    assert _allocated(dst) < 1 << 20  # sparse in, sparse out
    off = _offsets(dst)
    assert off["arc/big"] % BLOCK == at_big % BLOCK
    with zipfile.ZipFile(dst) as z:
        infos = {i.filename: i for i in z.infolist()}
        assert infos["arc/big"].file_size == BIG and infos["arc/big"].compress_size == BIG
        assert infos["arc/small"].header_offset > GIB4 and infos["arc/version"].header_offset > GIB4
        assert z.read("arc/small") == small and z.read("arc/version") == b"3\n"
        crc = infos["arc/small"].CRC
        assert crc == zlib.crc32(small)
        with z.open("arc/big") as f:
            assert f.read(1 << 20) == bytes(1 << 20)
    if shutil.which("unzip"):
        listing = subprocess.run(["unzip", "-l", str(dst)], capture_output=True, text=True, check=True).stdout
        assert str(BIG) in listing and "arc/small" in listing
    reader = torch._C.PyTorchFileReader(str(dst))
    assert reader.get_record("small") == small
    assert reader.get_record_offset("small") == off["arc/small"]  # type: ignore[attr-defined]
    assert reader.get_record_offset("big") == off["arc/big"]  # type: ignore[attr-defined]


@pytest.mark.slow
def test_zip64_npz_and_pth(tmp_path: Path) -> None:
    """An .npz holding a 4 GiB + 100 byte array (a hole) and a small one after it, read by numpy.load; a .pth
    written by save_zip whose 4 GiB storage is copied from a sparse file, read by torch.load(mmap=True)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (BIG,)})
    head = header.getvalue()
    small = np.arange(10, dtype=np.float32)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, small)
    small_npy = buf.getvalue()
    at = 5 * BLOCK + 1000
    src = _sparse(tmp_path / "src.bin", at + len(head) + BIG, [(at, head)])
    npz = tmp_path / "big.npz"
    write_zip(
        npz,
        [
            Member("big.npy", len(head) + BIG, source=(src, at), crc=crc32_zeros(BIG, zlib.crc32(head))),
            Member("small.npy", len(small_npy), data=small_npy),
        ],
    )
    assert _allocated(npz) < 1 << 20
    with np.load(npz) as got:
        assert got.files == ["big", "small"]
        assert np.array_equal(got["small"], small)
    with zipfile.ZipFile(npz) as z, z.open("big.npy") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        assert np.lib.format.read_array_header_1_0(f)[0] == (BIG,)
    # .pth: the storage is a mapping of the sparse file (nothing read), located there by save_zip
    zeros = tmp_path / "zeros.bin"
    _sparse(zeros, 4096 + BIG, [])
    mapped = torch.from_numpy(np.memmap(zeros, dtype=np.uint8, mode="c", offset=4096, shape=(BIG,)))
    obj = {"big": mapped, "small": torch.arange(5.0), "epoch": 3}
    start = mapped.untyped_storage().data_ptr()

    def locate(address: int, nbytes: int) -> tuple[Path, int, int | None] | None:
        return (zeros, 4096, _zeros_crc()) if address == start and nbytes == BIG else None

    pth = tmp_path / "big.pth"
    assert save_zip(obj, pth, locate)
    assert _allocated(pth) < 1 << 20
    with zipfile.ZipFile(pth) as z:
        big_member = max(z.infolist(), key=lambda i: i.file_size)
        assert big_member.file_size == BIG
        assert max(i.header_offset for i in z.infolist()) > GIB4
    assert _offsets(pth)[big_member.filename] % BLOCK == 0
    loaded = torch.load(pth, mmap=True, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["small"], torch.arange(5.0))
    assert loaded["big"].shape == (BIG,) and loaded["big"][-100:].eq(0).all()


@pytest.mark.slow
def test_zip64_member_count(tmp_path: Path) -> None:
    """Over 65535 members: the count goes in the ZIP64 end record."""
    n = 0x10000 + 5
    members = [Member(f"m{i}", 1, data=bytes([i % 256])) for i in range(n)]
    dst = tmp_path / "many.zip"
    write_zip(dst, members)
    with zipfile.ZipFile(dst) as z:
        infos = z.infolist()
        assert len(infos) == n
        assert z.read(f"m{n - 1}") == bytes([(n - 1) % 256])


# ---------------------------------------------------------------- 3. .npz outputs


def _npz_expectation(src: Path, out: Path, changed: dict[str, tuple[int, ...]]) -> None:
    """What the previous writer (zipfile, the input's member order and compression) gave: every member in the
    input's order with its compression, date and attributes; changed arrays by shape, the rest bit for bit."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(out) as zo:
        assert zo.testzip() is None
        ins, outs = zi.infolist(), zo.infolist()
        assert [i.filename for i in outs] == [i.filename for i in ins]
        for a, b in zip(ins, outs, strict=True):
            assert b.compress_type == a.compress_type, a.filename
            assert (b.date_time, b.external_attr) == (a.date_time, a.external_attr), a.filename
    with np.load(src) as want, np.load(out) as got:
        assert got.files == want.files
        for k in want.files:
            arr = got[k]  # numpy reads every array
            assert arr.dtype == want[k].dtype, k
            if k in changed:
                assert arr.shape == changed[k], k
            else:
                assert arr.shape == want[k].shape and arr.tobytes() == want[k].tobytes(), k
    _unzip_ok(out)


def _changed(rep: vitresize.Report) -> dict[str, tuple[int, ...]]:
    return {c.key: c.new_shape for c in rep.plan.changes}


def test_npz_output_as_the_previous_writer(tmp_path: Path) -> None:
    src, out = FAM / "vit_jax.npz", tmp_path / "o.npz"
    rep = vitresize.convert(src, out, img_size=48)
    changed = _changed(rep)
    assert changed == {"Transformer/posembed_input/pos_embedding": (1, 37, 16)}
    _npz_expectation(src, out, changed)
    with zipfile.ZipFile(out) as z:  # small members are not padded
        assert all(_unpadded(out, i.filename) for i in z.infolist())


def _with_big_array(tmp_path: Path, compressed: bool) -> Path:
    with np.load(FAM / "vit_jax.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["extra/big"] = np.random.default_rng(3).standard_normal(40_000).astype(np.float32)  # 160 KB
    path = tmp_path / ("big_c.npz" if compressed else "big.npz")
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def test_npz_unknown_large_array_kept_and_congruent(tmp_path: Path) -> None:
    src, out = _with_big_array(tmp_path, compressed=False), tmp_path / "o.npz"
    rep = vitresize.convert(src, out, img_size=48)
    _npz_expectation(src, out, _changed(rep))
    name = "extra/big.npy"
    assert _offsets(out)[name] % BLOCK == _offsets(src)[name] % BLOCK
    assert _raw(out, name) == _raw(src, name)


def test_npz_corrupt_unchanged_member_refused(tmp_path: Path) -> None:
    """A flipped byte in a large copied member is caught by its CRC, as the previous writer caught it."""
    src = _with_big_array(tmp_path, compressed=False)
    at = _offsets(src)["extra/big.npy"] + 50_000
    raw = bytearray(src.read_bytes())
    raw[at] ^= 0xFF
    src.write_bytes(bytes(raw))
    out = tmp_path / "o.npz"
    with pytest.raises(CheckpointFormatError):
        vitresize.convert(src, out, img_size=48)
    assert not out.exists()


def test_npz_compressed_members_copied_as_stored(tmp_path: Path) -> None:
    """write_npz of a savez_compressed input with nothing changed: every member deflated as it was, its
    compressed bytes copied (the large one congruent), the arrays equal."""
    src, out = _with_big_array(tmp_path, compressed=True), tmp_path / "o.npz"
    write_npz(NpzCheckpoint(src), {}, out)
    _npz_expectation(src, out, {})
    with zipfile.ZipFile(src) as z:
        names = [i.filename for i in z.infolist()]
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    for name in names:
        assert _raw(out, name) == _raw(src, name), name
    big = "extra/big.npy"
    assert len(_raw(src, big)) >= CLONE_MIN
    assert _offsets(out)[big] % BLOCK == _offsets(src)[big] % BLOCK


def test_npz_compressed_input_converted(tmp_path: Path) -> None:
    src = tmp_path / "c.npz"
    with np.load(FAM / "vit_jax.npz") as z:
        np.savez_compressed(src, **{k: z[k] for k in z.files})
    out = tmp_path / "o.npz"
    rep = vitresize.convert(src, out, img_size=48)
    _npz_expectation(src, out, _changed(rep))
    with zipfile.ZipFile(out) as z:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())


# ---------------------------------------------------------------- 4. .pth outputs


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}/{i}")
    else:
        yield path, obj


def _assert_same(got: Any, want: Any, path: str = "") -> None:
    """The same nesting, keys in order, non-tensor values, and tensors (dtype, shape, strides, bytes)."""
    assert type(got) is type(want), path
    if isinstance(want, dict):
        assert list(got) == list(want), path
        for k in want:
            _assert_same(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{path}/{i}")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride(), path
        assert got.storage_offset() == want.storage_offset(), path
        assert digest(got) == digest(want), path
    else:
        assert got == want, path


def _sharing(obj: Any) -> list[list[str]]:
    """The tensors that share a storage, grouped by path."""
    groups: dict[int, list[str]] = {}
    for path, v in _leaves(obj):
        if isinstance(v, torch.Tensor) and v.untyped_storage().nbytes():
            groups.setdefault(v.untyped_storage().data_ptr(), []).append(path)
    return sorted(sorted(g) for g in groups.values())


def _convert_both(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[Path, Path]:
    """``src`` converted to .pth by the zip writer, and by the previous path (torch.save)."""
    new, old = tmp_path / "new.pth", tmp_path / "old.pth"
    vitresize.convert(src, new, img_size=48, **kw)
    with monkeypatch.context() as m:
        m.setattr(_torch_zip, "save_zip", lambda *a, **k: False)
        vitresize.convert(src, old, img_size=48, **kw)
    return new, old


def _assert_loads_as_old(new: Path, old: Path) -> None:
    for mmap in (False, True):
        got = torch.load(new, weights_only=True, mmap=mmap)
        want = torch.load(old, weights_only=True, mmap=mmap)
        _assert_same(got, want)
        assert _sharing(got) == _sharing(want)
    assert check_zip(new) and read_zip_index(new) is not None  # vitresize's own index models the file


def _names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return [i.filename for i in z.infolist()]


def _assert_layout(new: Path, old: Path) -> None:
    """One ``archive/`` folder, torch's records less the two left out, small storages 64-aligned."""
    names = _names(new)
    assert all(n.startswith("archive/") for n in names)
    assert {"archive/data.pkl", "archive/byteorder", "archive/version"} <= set(names)
    storages = sorted(int(n.rsplit("/", 1)[1]) for n in names if n.startswith("archive/data/"))
    assert storages == list(range(len(storages))) and storages
    left_out = {"archive/.format_version", "archive/.storage_alignment"}
    assert set(names) == set(_names(old)) - left_out
    assert names.index("archive/data.pkl") == 0 and names.index("archive/byteorder") < names.index("archive/data/0")
    with zipfile.ZipFile(new) as z:
        assert z.testzip() is None
        assert all(i.compress_type == STORED for i in z.infolist())
        sizes = {i.filename: i.file_size for i in z.infolist()}
    for name, at in _offsets(new).items():
        if sizes[name] < CLONE_MIN:
            assert at % 64 == 0, name
    _unzip_ok(new)


def _assert_congruent(src_offsets: dict[int, tuple[int, bytes]], out: Path) -> int:
    """Every large storage of the input (offset -> (size, bytes)) lies in ``out`` with identical bytes, at an
    offset congruent with its source's; returns how many were checked."""
    out_off = _offsets(out)
    by_bytes: dict[bytes, list[int]] = {}
    for name, at in out_off.items():
        if "/data/" in name:
            by_bytes.setdefault(_raw(out, name), []).append(at)
    checked = 0
    for at, (size, raw) in src_offsets.items():
        if size >= CLONE_MIN:
            assert any(o % BLOCK == at % BLOCK for o in by_bytes[raw]), at
            checked += 1
    return checked


def _zip_storages(path: Path) -> dict[int, tuple[int, bytes]]:
    with zipfile.ZipFile(path) as z:
        return {off: (z.getinfo(n).file_size, _raw(path, n)) for n, off in _offsets(path).items() if "/data/" in n}


def _container(tmp_path: Path) -> Path:
    """A training-style container: two state dicts (fp32 and bf16, each with a large unknown tensor, a view
    sharing its storage, one tensor under two keys), one of them reached by two keys, and non-tensor entries."""
    gen = torch.Generator().manual_seed(0)
    sd = dict(torch.load(fixture("timm_vit_cls.pth"), weights_only=True))
    sd["extra.big"] = torch.randn(64, 1024, generator=gen)  # 256 KiB
    sd["extra.view"] = sd["extra.big"][3:5, 7:]
    sd["extra.same"] = sd["head.weight"]
    sd2 = {k: (v + 1).to(torch.bfloat16) for k, v in sd.items() if k not in ("extra.view", "extra.same")}
    sd2["extra.big"] = torch.randn(40, 2048, generator=gen).to(torch.bfloat16)  # 160 KiB
    container = {
        "model": sd,
        "epoch": 3,
        "ema": sd2,
        "alias": sd,
        "step": torch.tensor(7),
        "meta": {"lr": 0.5, "tags": ["a", "b"], "pair": (1, "x"), "none": None},
    }
    path = tmp_path / "in.pth"
    torch.save(container, path)
    return path


def test_pth_fixture_as_torch_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    new, old = _convert_both(fixture("timm_vit_cls.pth"), tmp_path, monkeypatch)
    _assert_loads_as_old(new, old)
    _assert_layout(new, old)


def test_pth_container_as_torch_save_and_congruent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _container(tmp_path)
    new, old = _convert_both(src, tmp_path, monkeypatch)
    _assert_loads_as_old(new, old)
    _assert_layout(new, old)
    got = torch.load(new, weights_only=True, mmap=True)
    assert got["alias"] is got["model"]
    assert (
        got["model"]["extra.view"].untyped_storage().data_ptr()
        == got["model"]["extra.big"].untyped_storage().data_ptr()
    )
    assert got["model"]["pos_embed"].shape == (1, 37, 16) and got["ema"]["pos_embed"].dtype == torch.bfloat16
    assert _assert_congruent(_zip_storages(src), new) == 2
    # inspect reads it (through the torch-free index), and it converts again, as a .pth with large storages
    ins = vitresize.inspect(new)
    assert [(e.state_dict, e.source and e.source.grid) for e in ins.embeddings] == [("model", (6, 6)), ("ema", (6, 6))]
    again = tmp_path / "again.pth"
    vitresize.convert(new, again, img_size=32)
    back = torch.load(again, weights_only=True)
    want = torch.load(src, weights_only=True)
    for sd in ("model", "ema"):
        assert back[sd]["pos_embed"].shape == (1, 17, 16)
        for k in want[sd]:
            if k != "pos_embed":
                _assert_same(back[sd][k], want[sd][k], k)
    assert _assert_congruent(_zip_storages(new), again) == 2


def _misaligned_safetensors(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """The fixture's tensors behind a 3-byte tensor, then a large one: data at offsets no dtype aligns
    (safetensors does not require alignment; save_file sorts by dtype size, so the file is written by hand)."""
    import json
    import struct

    sd = load_file(str(fixture("timm_vit_cls.safetensors")))
    items = [("odd", torch.arange(3, dtype=torch.uint8)), *sd.items()]
    items.append(("extra.big", torch.randn(64, 1024, generator=torch.Generator().manual_seed(4))))
    header: dict[str, dict[str, Any]] = {}
    blobs, at = [], 0
    for k, v in items:
        raw = v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": "U8" if v.dtype == torch.uint8 else "F32", "shape": list(v.shape)}
        header[k]["data_offsets"] = [at, at + len(raw)]
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    base = 8 + len(text)
    return path, {k: base + v["data_offsets"][0] for k, v in header.items()}


def test_pth_from_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    new, old = _convert_both(fixture("timm_vit_cls.safetensors"), tmp_path, monkeypatch)
    _assert_loads_as_old(new, old)
    _assert_layout(new, old)


def test_pth_from_misaligned_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large tensor at an odd offset is not placed congruent with it (that would misalign it): it is 64-aligned
    as torch.save aligns storages, and torch reads it."""
    src, offsets = _misaligned_safetensors(tmp_path)
    assert offsets["extra.big"] % 4 == 3
    new, old = _convert_both(src, tmp_path, monkeypatch)
    _assert_loads_as_old(new, old)
    big = load_file(str(src))["extra.big"]
    raw = big.reshape(-1).view(torch.uint8).numpy().tobytes()
    placed = [at for name, at in _offsets(new).items() if "/data/" in name and _raw(new, name) == raw]
    assert placed and all(at % 64 == 0 for at in placed)
    got = torch.load(new, weights_only=True, mmap=True)["extra.big"]
    assert torch.equal(got, big) and torch.equal(got @ got.T, big @ big.T)


def test_pth_from_legacy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A legacy pickle has no mapped storages: everything is written from memory, 64-aligned."""
    new, old = _convert_both(fixture("timm_vit_legacy.pth"), tmp_path, monkeypatch)
    _assert_loads_as_old(new, old)
    _assert_layout(new, old)
    legacy = tmp_path / "legacy_big.pth"
    torch.save(torch.load(_container(tmp_path), weights_only=True), legacy, _use_new_zipfile_serialization=False)
    sub = tmp_path / "big"
    sub.mkdir()
    a, b = _convert_both(legacy, sub, monkeypatch)
    _assert_loads_as_old(a, b)
    _assert_layout(a, b)
    assert all(at % 64 == 0 for at in _offsets(a).values())


# ---------------------------------------------------------------- 5. member names


def test_pth_member_names(tmp_path: Path) -> None:
    out = tmp_path / "o.pth"
    vitresize.convert(_container(tmp_path), out, img_size=48)
    names = _names(out)
    assert {n.split("/", 1)[0] for n in names} == {"archive"}
    assert {"archive/data.pkl", "archive/byteorder", "archive/version"} <= set(names)
    data = [n for n in names if n.startswith("archive/data/")]
    assert sorted(int(n.rsplit("/", 1)[1]) for n in data) == list(range(len(data)))
    with zipfile.ZipFile(out) as z:
        assert z.read("archive/byteorder") == b"little"
    assert torch.load(out, weights_only=True)["epoch"] == 3


# ---------------------------------------------------------------- 6. found in review


def test_a_storage_changed_in_place_is_written_as_it_is_in_memory(tmp_path: Path) -> None:
    """torch.load(mmap=True) maps the file privately: a tensor changed in place no longer holds the file's
    bytes, so it is not copied from the file (the whole mapping is written from memory)."""
    from vitresize.formats.torch_pickle import save_container

    src, dst = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save({"a": torch.ones(50_000), "b": torch.zeros(50_000)}, src)
    sd = torch.load(src, weights_only=True, mmap=True)
    sd["a"].mul_(3)
    save_container(sd, dst, sources=(src,))
    got = torch.load(dst, weights_only=True)
    assert got["a"].eq(3).all() and got["b"].eq(0).all()
    # untouched, the same storages are copied from the file (congruent) and read back equal
    sd = torch.load(src, weights_only=True, mmap=True)
    save_container(sd, dst.with_name("again.pth"), sources=(src,))
    assert torch.load(dst.with_name("again.pth"), weights_only=True)["a"].eq(1).all()


def test_a_corrupt_deflated_npz_member_is_one_line(tmp_path: Path, run: Any) -> None:
    """A compressed member whose deflate stream is broken: refused while writing, exit 1, no traceback."""
    arrays = dict(np.load(FAM / "vit_jax.npz"))
    arrays["extra"] = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)
    src = tmp_path / "c.npz"
    np.savez_compressed(src, **arrays)
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = z.getinfo("extra.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2 : start + info.compress_size // 2 + 400] = b"\xff" * 400
    src.write_bytes(bytes(data))
    res = run("convert", src, tmp_path / "o.npz", "--img-size", "48")
    assert res.exit_code == 1 and "Traceback" not in res.stderr, res.stderr
    assert "corrupt" in res.stderr and "extra.npy" in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "o.npz").exists()


def test_inflating_for_the_crc_check_takes_bounded_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each inflate call gives at most a chunk, however compressible the member (zeros inflate ~1000x)."""
    monkeypatch.setattr(_zip_write, "_CRC_CHUNK", 4096)
    zeros = bytes(1 << 20)
    packed = _deflate(zeros)
    src = _source(tmp_path, [(0, packed)], len(packed))
    limits: list[int] = []
    real = zlib.decompressobj

    class Spy:
        def __init__(self, *args: Any) -> None:
            self.inner = real(*args)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            limits.append(max_length)
            return self.inner.decompress(data, max_length)

        @property
        def unconsumed_tail(self) -> bytes:
            return self.inner.unconsumed_tail

    monkeypatch.setattr(_zip_write.zlib, "decompressobj", Spy)
    m = Member("z", len(zeros), source=(src, 0), stored_size=len(packed), compress_type=DEFLATED,
               crc=zlib.crc32(zeros), verify=True)  # fmt: skip
    write_zip(tmp_path / "o.zip", [m])
    monkeypatch.undo()  # zipfile inflates with the same module
    assert limits and all(0 < n <= 4096 for n in limits)
    with zipfile.ZipFile(tmp_path / "o.zip") as z:
        assert z.read("z") == zeros


def test_a_source_range_past_the_end_is_refused_before_writing(tmp_path: Path) -> None:
    src = _source(tmp_path, [], 1000)
    m = Member("big.npy", 10_000, source=(src, 500), verify=True, crc=0)
    with pytest.raises(CheckpointFormatError, match=r"big\.npy.*past the end of the file"):
        write_zip(tmp_path / "o.zip", [m])
    assert not (tmp_path / "o.zip").exists()  # refused before the output is created


def test_pth_without_crcs_falls_back_to_torch_save(tmp_path: Path) -> None:
    """torch.serialization.set_crc32_options(False): torch's in-memory records carry no CRC; torch.save writes."""
    src, dst = fixture("timm_vit_cls.pth"), tmp_path / "o.pth"
    torch.serialization.set_crc32_options(False)
    try:
        vitresize.convert(src, dst, img_size=48)
    finally:
        torch.serialization.set_crc32_options(True)
    sd = torch.load(dst, weights_only=True)
    assert sd["pos_embed"].shape[1] == 1 + 6 * 6


def test_padding_is_never_below_a_field_header() -> None:
    """Alignments under 4 still give a filler field of 4 bytes or more."""
    for align in (2, 3, 5):
        for name_len in range(1, 9):
            placed, _ = _zip_write._place([Member("n" * name_len, 3, data=b"abc", align=align)])
            assert placed[0].padding == 0 or placed[0].padding >= 4
            assert placed[0].data % align == 0
