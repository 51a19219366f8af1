"""NaN/Inf counting from raw little-endian bytes (``inspect`` without torch), checked against torch's own count."""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vitresize.formats import _dtypes, open_checkpoint
from vitresize.formats._dtypes import ST_DTYPES, TORCH_TO_ST, count_nonfinite
from vitresize.formats.base import ROOT, nonfinite
from vitresize.formats.safetensors import SafetensorsCheckpoint, tensor_bytes

COUNTED = ("float16", "bfloat16", "float32", "float64")
"""The wider floats, whose NaN/Inf are those with all exponent bits set."""
FLOAT8 = ("float8_e5m2", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
"""Also counted from bytes, each by its own rule; every code in neither tuple counts 0."""
FLOAT8_NONFINITE = {
    "float8_e5m2": 8,
    "float8_e4m3fn": 2,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}
"""NaN/Inf among each float8 dtype's 256 patterns: e5m2 +-Inf and 6 NaNs, e4m3fn +-NaN, the others one NaN each."""
NOT_FLOAT = ("bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "complex64")


def torch_dtype(name: str) -> torch.dtype:
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        pytest.skip(f"torch {torch.__version__} has no {name}")
    return d


def oracle(t: torch.Tensor) -> int:
    """torch's count: float64 holds every value of these dtypes exactly (float8 included)."""
    return int((~torch.isfinite(t.double())).sum())


def raw(t: torch.Tensor) -> bytes:
    """The tensor's little-endian bytes, as the safetensors reader hands them over."""
    return bytes(tensor_bytes(t))


def random_bits(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    size = torch.empty(0, dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g).view(dtype)


def every_pattern(dtype: torch.dtype) -> torch.Tensor:
    """All 2**8 or 2**16 bit patterns of a 1- or 2-byte dtype."""
    size = torch.empty(0, dtype=dtype).element_size()
    if size == 1:
        return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    assert size == 2
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def with_specials(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values with NaN, +-Inf, +-0, subnormals and the extremes mixed in."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(4096, generator=g, dtype=torch.float64) * 1e3).to(dtype)
    info = torch.finfo(dtype)
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, info.max, -info.max, info.tiny, info.tiny / 4]
    t[: len(specials)] = torch.tensor(specials, dtype=torch.float64).to(dtype)
    t[100::7] = float("nan")
    t[101::11] = float("inf")
    t[102::13] = -float("inf")
    return t


def test_every_code_is_classified() -> None:
    assert set(TORCH_TO_ST) == set(COUNTED) | set(FLOAT8) | set(NOT_FLOAT)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_every_16_bit_pattern_matches_torch(name: str) -> None:
    t = every_pattern(torch_dtype(name))
    want = oracle(t)
    assert want == 2 * 2 ** (16 - 1 - (5 if name == "float16" else 8))  # 2 signs x every mantissa, exponent all 1s
    assert count_nonfinite(raw(t), TORCH_TO_ST[name]) == want


@pytest.mark.parametrize("name", COUNTED + FLOAT8)
@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_match_torch(name: str, seed: int) -> None:
    t = random_bits(100_003, torch_dtype(name), seed)
    want = oracle(t)
    assert want > 0  # random bits: exponent all ones in 1 of 2**(exponent bits)
    data = raw(t)
    assert count_nonfinite(data, TORCH_TO_ST[name]) == want
    assert count_nonfinite(bytearray(data), TORCH_TO_ST[name]) == want  # the safetensors reader passes a bytearray


@pytest.mark.parametrize("name", COUNTED)
@pytest.mark.parametrize("seed", range(3))
def test_values_with_nan_and_inf_match_torch(name: str, seed: int) -> None:
    t = with_specials(torch_dtype(name), seed)
    assert count_nonfinite(raw(t), TORCH_TO_ST[name]) == oracle(t) > 0


@pytest.mark.parametrize("name", COUNTED)
def test_every_length_across_chunk_boundaries(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dtypes, "_CHUNK_BYTES", 24)  # 12, 6 or 3 elements a step
    t = random_bits(200, torch_dtype(name), seed=7)
    t[::5] = float("nan")
    for n in range(len(t) + 1):
        assert count_nonfinite(raw(t[:n]), TORCH_TO_ST[name]) == oracle(t[:n]), n


def test_real_chunk_boundary() -> None:
    n = _dtypes._CHUNK_BYTES // 2 * 2 + 3  # two full steps of BF16 and a bit
    t = random_bits(n, torch.bfloat16, seed=3)
    t[-1] = float("nan")
    t[_dtypes._CHUNK_BYTES // 2 - 1 : _dtypes._CHUNK_BYTES // 2 + 1] = float("inf")
    assert count_nonfinite(raw(t), "BF16") == oracle(t)


@pytest.mark.parametrize("name", NOT_FLOAT)
def test_other_codes_count_zero(name: str) -> None:
    """Integer and bool tensors have no NaN/Inf; complex ones count 0, as :func:`formats.base.nonfinite` does."""
    t = random_bits(4096, torch_dtype(name))
    assert count_nonfinite(raw(t), TORCH_TO_ST[name]) == 0


@pytest.mark.parametrize("name", FLOAT8)
def test_every_float8_pattern(name: str) -> None:
    t = every_pattern(torch_dtype(name))
    want = oracle(t)
    assert want == FLOAT8_NONFINITE[name] == int((~torch.isfinite(t.float())).sum()) == nonfinite(t)
    assert count_nonfinite(raw(t), TORCH_TO_ST[name]) == want
    for b in range(256):  # pattern by pattern, so a wrong rule names the byte
        assert count_nonfinite(bytes([b]), TORCH_TO_ST[name]) == oracle(t[b : b + 1]), hex(b)


@pytest.mark.parametrize("name", FLOAT8)
def test_float8_across_chunk_boundaries(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dtypes, "_CHUNK_BYTES", 7)
    g = torch.Generator().manual_seed(1)
    t = every_pattern(torch_dtype(name)).repeat(2)[torch.randperm(512, generator=g)]
    for n in range(len(t) + 1):
        assert count_nonfinite(raw(t[:n]), TORCH_TO_ST[name]) == oracle(t[:n]), n


def test_float8_through_the_safetensors_reader(tmp_path: Path) -> None:
    """``inspect`` of an fp8 safetensors file counts the NaN/Inf torch counts (it counted 0)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, name in enumerate(FLOAT8):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4096, generator=g, dtype=torch.float64) * 100
        x[::5] = float("nan")
        x[1::7] = float("inf")
        x[2::9] = -float("inf")
        tensors[name] = x.to(torch_dtype(name)).reshape(64, 64)
        tensors[f"{name}.every"] = every_pattern(torch_dtype(name))
    save_file(tensors, str(tmp_path / "fp8.safetensors"))
    with SafetensorsCheckpoint(tmp_path / "fp8.safetensors") as ckpt:
        for key, t in tensors.items():
            want = int((~torch.isfinite(t.float())).sum())
            assert want > 0, key
            assert ckpt.count_nonfinite("", key) == want == nonfinite(ckpt.tensor(ROOT, key)), key


@pytest.mark.parametrize("code", ["F16", "BF16", "F32", "F64", "F8_E4M3", "I64", "BOOL", "NOPE", ""])
def test_no_bytes_no_nonfinite(code: str) -> None:
    assert count_nonfinite(b"", code) == 0


def test_through_the_safetensors_reader(tmp_path: Path) -> None:
    tensors = {name: with_specials(torch_dtype(name), seed=i) for i, name in enumerate(COUNTED)}
    tensors["int"] = torch.arange(10)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        for key, t in tensors.items():
            assert ckpt.count_nonfinite(ROOT, key) == oracle(t), key


def test_through_the_zip_pth_reader(tmp_path: Path) -> None:
    tensors = {name: with_specials(torch_dtype(name), seed=i) for i, name in enumerate(COUNTED)}
    torch.save(tensors, tmp_path / "m.pth")
    with open_checkpoint(tmp_path / "m.pth") as ckpt:
        for key, t in tensors.items():
            assert ckpt.raw_bytes(ROOT, key) is not None, key  # counted from the bytes, not by torch
            assert ckpt.count_nonfinite(ROOT, key) == oracle(t), key


def test_a_large_tensor_is_counted_in_bounded_memory() -> None:
    """50M bf16 elements (100 MB): counted in numpy steps of a few MiB, never a Python loop over elements."""
    t = random_bits(50_000_000, torch.bfloat16, seed=11)
    want = int((~torch.isfinite(t)).sum())
    data = raw(t)
    tracemalloc.start()
    try:
        got = count_nonfinite(data, "BF16")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == want
    assert peak < 4 * _dtypes._CHUNK_BYTES  # numpy reports its buffers to tracemalloc


def test_counting_does_not_import_torch(tmp_path: Path) -> None:
    import subprocess

    t = with_specials(torch.bfloat16, seed=5)
    (tmp_path / "t.bin").write_bytes(raw(t))
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from vitresize.formats._dtypes import count_nonfinite\n"
        f"n = count_nonfinite(Path({str(tmp_path / 't.bin')!r}).read_bytes(), 'BF16')\n"
        "print(n, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(oracle(t)), "False"]


def test_codes_cover_the_reader() -> None:
    counted = COUNTED + FLOAT8
    assert {TORCH_TO_ST[n] for n in counted} == set(_dtypes._NONFINITE)
    assert all(ST_DTYPES[TORCH_TO_ST[n]][1] == torch.empty(0, dtype=torch_dtype(n)).element_size() for n in counted)
    for n in counted:  # numpy reads elements of the dtype's size
        assert np.dtype(_dtypes._NONFINITE[TORCH_TO_ST[n]][0]).itemsize == ST_DTYPES[TORCH_TO_ST[n]][1], n
