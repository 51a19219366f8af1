"""The torch-free resampler: bit for bit against timm's ``resample_abs_pos_embed``, on every kernel torch picks.

Also: conversions that use it never import torch and write the same bytes as the torch path; anything it does
not reproduce (another convention, a patch change, non-finite values) goes to torch.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, fixture
from timm.layers import resample_abs_pos_embed

import vitresize
from vitresize.resample import torchfree
from vitresize.resample.conventions import METHODS, PATCH_BASIS
from vitresize.resample.torchfree import kernel_variant, matches_convention, resample_pos_table

VARIANT = kernel_variant()
needs_variant = pytest.mark.skipif(VARIANT is None, reason="torch-free resampling is not verified on this platform")

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _sweep(seed: int, cases: int, variant: str) -> list[str]:
    """Random tables (grids 1..40 -> 1..64, non-square, 0-5 prefix rows, fp32/fp16/bf16): the mismatches."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    bad = []
    for _ in range(cases):
        old = (rng.randint(1, 40), rng.randint(1, 40))
        new = (rng.randint(1, 64), rng.randint(1, 64))
        dim, prefix = rng.choice([2, 3, 8, 17, 64, 300]), rng.randint(0, 5)
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        scale = rng.choice([0.02, 1.0, 50.0])
        pe = (torch.randn(1, prefix + old[0] * old[1], dim, generator=gen) * scale).to(dtype)
        if rng.random() < 0.3:
            pe = pe[0]  # [L, D] (open_clip, HF CLIP)
        want = resample_abs_pos_embed(pe if pe.ndim == 3 else pe[None], list(new), list(old), prefix)
        want = want if pe.ndim == 3 else want[0]
        raw = pe.contiguous().view(torch.uint8).numpy().tobytes()
        got = resample_pos_table(
            raw,
            str(dtype).removeprefix("torch."),
            tuple(pe.shape),
            old_grid=old,
            new_grid=new,
            num_prefix_tokens=prefix,
            variant=variant,
        )
        case = f"{old}->{new} dim={dim} prefix={prefix} {dtype} {list(pe.shape)}"
        if got is None:
            bad.append(f"{case}: declined")
        elif got.shape != tuple(want.shape) or got.to_bytes() != want.view(_INT_VIEW[dtype]).numpy().tobytes():
            bad.append(f"{case}: differs")
    return bad


@needs_variant
@pytest.mark.parametrize("seed", range(4))
def test_equals_timm_bit_for_bit(seed: int) -> None:
    assert VARIANT is not None
    assert _sweep(seed, 60, VARIANT) == []


def _resampled_f32(
    pe: torch.Tensor, old: tuple[int, int], new: tuple[int, int], variant: str, prefix: int = 0
) -> bytes:
    """vitresize's resampling of a float32 table ``pe``, as bytes (``None`` from it fails the test)."""
    got = resample_pos_table(
        pe.numpy().tobytes(),
        "float32",
        tuple(pe.shape),
        old_grid=old,
        new_grid=new,
        num_prefix_tokens=prefix,
        variant=variant,
    )
    assert got is not None
    return bytes(got.to_bytes())


@needs_variant
def test_vit_giant_table_equals_timm() -> None:
    pe = torch.randn(1, 257, 1408, generator=torch.Generator().manual_seed(0)) * 0.02
    want = resample_abs_pos_embed(pe, [28, 28], [16, 16], num_prefix_tokens=1)
    assert VARIANT is not None
    assert _resampled_f32(pe, (16, 16), (28, 28), VARIANT, prefix=1) == want.numpy().tobytes()


_SWEEP_SCRIPT = (
    "import sys; sys.path.insert(0, 'tests')\n"
    "import torch\n"
    "from test_torchfree import _sweep\n"
    "from vitresize.resample.torchfree import kernel_variant\n"
    "print(torch.backends.cpu.get_cpu_capability(), kernel_variant())\n"
    "bad = _sweep(7, 40, kernel_variant())\n"
    "print(len(bad)); print(*bad[:5], sep='\\n')\n"
)


@needs_variant
@pytest.mark.slow
@pytest.mark.parametrize(("capability", "variant"), [("default", "plain"), ("avx2", "fma")])
def test_other_torch_kernels(capability: str, variant: str) -> None:
    """torch's other CPU builds of the kernel (ATEN_CPU_CAPABILITY picks one), in a fresh process."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run(
        [sys.executable, "-c", _SWEEP_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0].split() == [capability.upper(), variant]
    assert out[1] == "0", out[2:]


def test_kernel_variant_follows_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    def variant(env: str | None = None, version: str = "2.14.1+cu130") -> str | None:
        if env is None:
            monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        else:
            monkeypatch.setenv("ATEN_CPU_CAPABILITY", env)
        monkeypatch.setattr(torchfree, "_torch_version", lambda: version)
        kernel_variant.cache_clear()
        return kernel_variant()

    try:
        monkeypatch.setattr(torchfree.sys, "platform", "linux")
        monkeypatch.setattr(torchfree.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(torchfree, "_cpu_flags", lambda: {"sse2", "avx2", "fma"})
        assert variant() == "fma"
        assert variant("avx512") == "fma"
        assert variant("default") == "plain"
        assert variant("zvector") is None
        assert variant(version="2.13.0") is None  # not verified
        monkeypatch.setattr(torchfree, "_cpu_flags", lambda: {"sse2", "avx"})
        assert variant() == "plain"
        monkeypatch.setattr(torchfree, "_cpu_flags", lambda: None)
        assert variant() is None
        monkeypatch.setattr(torchfree.platform, "machine", lambda: "aarch64")
        assert variant() is None
    finally:
        monkeypatch.undo()
        kernel_variant.cache_clear()


def test_torch_version_is_read_without_importing_torch() -> None:
    script = (
        "import sys\n"
        "from vitresize.resample.torchfree import _torch_version\n"
        "print(_torch_version(), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [torch.__version__, "False"]


def test_torch_version_falls_back_to_the_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.machinery
    import importlib.metadata
    import importlib.util

    spec = importlib.machinery.ModuleSpec("torch", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.14.0")
    (tmp_path / "version.py").write_text("from typing import Optional\n__version__: str = '2.14.2+cpu'\n")
    assert torchfree._torch_version() == "2.14.2+cpu"
    (tmp_path / "version.py").write_text("# no version here\n")
    assert torchfree._torch_version() == "2.14.0"
    (tmp_path / "version.py").unlink()
    assert torchfree._torch_version() == "2.14.0"

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert torchfree._torch_version() is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert torchfree._torch_version() is None


@needs_variant
def test_declines_what_it_does_not_reproduce() -> None:
    assert VARIANT is not None

    def run(t: torch.Tensor, prefix: int = 1) -> object:
        return resample_pos_table(
            t.view(torch.uint8).numpy().tobytes() if t.is_floating_point() else t.numpy().tobytes(),
            str(t.dtype).removeprefix("torch."),
            tuple(t.shape),
            old_grid=(2, 2),
            new_grid=(3, 3),
            num_prefix_tokens=prefix,
            variant=VARIANT,
        )

    ok = torch.randn(1, 5, 4)
    assert run(ok) is not None
    nan = ok.clone()
    nan[0, 3, 1] = float("nan")
    assert run(nan) is None
    assert run(torch.randn(1, 5, 1)) is None  # one channel: torch takes another loop
    assert run(torch.randn(1, 5, 4).double()) is None
    assert run(torch.randn(1, 6, 4)) is None  # rows do not add up
    assert run(torch.randn(1, 5, 4), prefix=2) is None
    big = torch.tensor([1.0, 3e38, -3e38, -3e38, 3e38]).reshape(1, 5, 1).expand(1, 5, 4).contiguous()
    assert run(big) is None  # overshoots to Inf


def test_matches_only_timms_convention() -> None:
    assert matches_convention(METHODS["timm"]) and matches_convention(METHODS["open_clip"])
    assert matches_convention(PATCH_BASIS)
    for name in ("torchvision", "deit", "hf", "dinov2", "big_vision"):
        assert not matches_convention(METHODS[name])


_NO_TORCH_SCRIPT = (
    "import sys\n"
    "import vitresize\n"
    "rep = vitresize.convert(sys.argv[1], sys.argv[2], img_size=int(sys.argv[3]))\n"
    "print(rep.engine, 'torch' in sys.modules)\n"
)


@needs_variant
@pytest.mark.parametrize(
    ("name", "img"),
    [
        ("timm_vit_cls.safetensors", 48),
        ("timm_vit_cls.pth", 24),
        ("timm_vit_bf16.safetensors", 48),
        ("timm_vit_fp16.pth", 48),
        ("timm_vit_reg4.safetensors", 48),
        ("deit_distilled.pth", 48),
        ("families/open_clip.pth", 64),
    ],
)
def test_convert_without_torch_writes_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, img: int
) -> None:
    fast = tmp_path / "fast.safetensors"
    out = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_SCRIPT, fixture(name), fast, str(img)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["numpy", "False"]
    monkeypatch.setattr(torchfree, "kernel_variant", lambda: None)
    slow = tmp_path / "slow.safetensors"
    assert vitresize.convert(fixture(name), slow, img_size=img).engine == "torch"
    assert fast.read_bytes() == slow.read_bytes()


def test_a_folder_of_safetensors_shards_converts_without_torch(tmp_path: Path) -> None:
    rep = vitresize.convert(fixture("families/hf_vit_sharded"), tmp_path / "o", img_size=48, method="timm")
    assert rep.engine == ("numpy" if VARIANT else "torch")


@pytest.mark.parametrize(
    ("kwargs", "dst"),
    [
        ({"img_size": 24, "patch": 4}, "o.safetensors"),  # a patch change needs torch's pinv
        ({"img_size": 48, "method": "deit"}, "o.safetensors"),  # another convention
        ({"img_size": 48}, "o.pth"),  # torch.save writes it
    ],
)
def test_torch_does_the_rest(tmp_path: Path, kwargs: dict[str, object], dst: str) -> None:
    rep = vitresize.convert(fixture("timm_vit_cls.pth"), tmp_path / dst, **kwargs)  # type: ignore[arg-type]
    assert rep.engine == "torch"


def test_nothing_to_resample_has_no_engine(tmp_path: Path) -> None:
    rep = vitresize.convert(fixture("timm_vit_cls.pth"), tmp_path / "o.safetensors", img_size=32)
    assert rep.engine is None and not rep.plan.changes


def test_verbose_and_json_say_what_resampled(tmp_path: Path, run: object) -> None:
    import json

    res = run("convert", fixture("timm_vit_cls.pth"), tmp_path / "o.safetensors", "--img-size", "48", "-v")  # type: ignore[operator]
    assert res.exit_code == 0
    assert "resampled by" in res.stdout
    assert ("torch not imported" in res.stdout) == (VARIANT is not None)
    res = run("convert", fixture("timm_vit_cls.pth"), tmp_path / "o.pth", "--img-size", "48", "--json")  # type: ignore[operator]
    assert json.loads(res.stdout)["engine"] == "torch"


@pytest.mark.parametrize("verify", [False, True])
def test_nothing_to_resample_imports_no_torch(tmp_path: Path, verify: bool) -> None:
    """A no-op target (the source's own geometry) copies a safetensors file without importing torch."""
    script = (
        "import sys\nimport vitresize\n"
        "rep = vitresize.convert(sys.argv[1], sys.argv[2], img_size=32, verify=sys.argv[3] == '1')\n"
        "print(rep.engine, len(rep.plan.changes), 'torch' in sys.modules)\n"
    )
    dst = tmp_path / "same.safetensors"
    src = fixture("timm_vit_cls.safetensors")
    out = subprocess.run(
        [sys.executable, "-c", script, src, dst, "1" if verify else "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["None", "0", "False"]


@needs_variant
@pytest.mark.parametrize(
    ("old", "new", "scale"), [((5, 7), (9, 4), 1e-38), ((6, 6), (11, 13), 1e-41), ((12, 4), (7, 9), 1e-44)]
)
def test_values_near_the_subnormals_equal_timm(
    monkeypatch: pytest.MonkeyPatch, old: tuple[int, int], new: tuple[int, int], scale: float
) -> None:
    """Sums that may fall below ``2**-126``, where the float64 of a halfway sum has more low 0 bits: checked
    as such (``normal`` false), and like the others once the values are scaled up."""
    assert VARIANT is not None
    gen = torch.Generator().manual_seed(5)
    tiny = (torch.randn(1, old[0] * old[1], 24, generator=gen, dtype=torch.float64) * scale).float()
    tiny[0, ::3, ::2] = 0.0
    fma_into = torchfree._fma_into
    normal: list[bool] = []
    monkeypatch.setattr(torchfree, "_fma_into", lambda *args: normal.append(args[-1]) or fma_into(*args))
    for pe, stays_normal in [(tiny, False), (tiny / scale, True)]:
        normal.clear()
        want = resample_abs_pos_embed(pe, list(new), list(old), 0).numpy().tobytes()
        assert _resampled_f32(pe, old, new, VARIANT) == want
        assert set(normal) == ({stays_normal} if VARIANT == "fma" else set())


def _odd_significand(x: float) -> tuple[int, int]:
    """``(W, e)`` with ``|x| = W * 2**e``, ``W`` odd (``x`` a nonzero float32)."""
    mantissa, e = math.frexp(abs(x))
    m = int(mantissa * 2**24)
    zeros = (m & -m).bit_length() - 1
    return m >> zeros, e - 24 + zeros


def _trap_product(w: float) -> tuple[int, int, int] | None:
    """``(T, m, r)``: ``T < 2**24`` with ``T * W = 2**(m-1) + r (mod 2**m)``, ``0 < |r| < 2**(m-30)`` (``W``:
    ``w``'s odd significand). Scaled so that ``2**m`` is a float32 spacing, ``T * W`` is just off halfway, by
    less than float64 resolves there; added to a float32 of that spacing, it rounds to exactly halfway."""
    big_w = _odd_significand(w)[0]
    for m in range(31, 41):  # (the search grows as 2**m; up to 40 finds one for ~1 in 4 weights)
        inv = pow(big_w, -1, 2**m)
        for r in [s * k for k in range(1, 2 ** (m - 30)) for s in (1, -1)]:
            t = (2 ** (m - 1) + r) * inv % 2**m
            if 0 < t < 2**24:
                return t, m, r
    return None


def _double_rounding_traps(n_in: int, n_out: int, dim: int, zeros: bool) -> torch.Tensor:
    """A ``[n_in, dim]`` float32 table (rows: the resampled axis) where one channel per output that the weights
    allow has a first fused sum (``acc = t0 * w0``, then ``fma(t1, w1, acc)``) that rounds differently in
    float64-then-float32 than in one FMA; its later taps 0 with ``zeros``, other values random."""
    first, count, w = torchfree._axis_weights(n_in, n_out, True)
    gen = torch.Generator().manual_seed(n_in * 100 + n_out)
    table = torch.randn(n_in, dim, generator=gen)
    channel = 0
    for i in range(n_out):
        if not 2 <= count[i] <= 4 or w[i, 0] == 0 or w[i, 1] == 0 or channel >= dim:
            continue  # (the 2nd product is fused for 2 to 4 taps)
        trap = _trap_product(float(w[i, 1]))
        if trap is None:
            continue
        t, m, r = trap
        big_w, e_w = _odd_significand(float(w[i, 1]))
        j = -23  # acc in [1, 2), its float32 spacing 2**j
        t1 = math.copysign(math.ldexp(t, j - m - e_w), float(w[i, 1]))  # t1 * w1 = T * W * 2**(j - m) > 0
        q = (t * big_w) >> m  # acc + t1 * w1 = (acc / 2**j + q + 1/2 + r / 2**m) * 2**j
        t0 = np.float32(1.25 / float(w[i, 0]))
        for _ in range(64):  # acc = fl(t0 * w0) with the parity that makes ties-to-even round the wrong way
            acc = np.float32(t0 * np.float32(w[i, 0]))
            if 1 <= acc < 1.9 and (int(math.ldexp(float(acc), -j)) + q) % 2 == (r < 0):
                break
            t0 = np.nextafter(t0, np.float32(np.inf))
        table[first[i], channel] = float(t0)
        table[first[i] + 1, channel] = t1
        if zeros:
            table[first[i] + 2 : first[i] + count[i], channel] = 0.0
        channel += 1
    return table


@pytest.mark.parametrize(("n_in", "n_out", "zeros"), [(16, 28, False), (5, 9, True), (6, 11, True)])
@pytest.mark.parametrize("axis", ["width", "height"])
def test_fused_sums_that_float64_rounds_to_a_tie(
    monkeypatch: pytest.MonkeyPatch, n_in: int, n_out: int, zeros: bool, axis: str
) -> None:
    """Sums whose float64 value is exactly halfway between two float32: only the FMA's single rounding gives
    torch's bits, so the round-to-odd fix-up must find and move them (in a few outputs of a pass, or, with the
    zeros' exact sums, in many)."""
    if VARIANT != "fma":
        pytest.skip("torch's kernel here does not fuse")
    rows = _double_rounding_traps(n_in, n_out, 16, zeros)
    old, new = ((1, n_in), (1, n_out)) if axis == "width" else ((n_in, 1), (n_out, 1))
    pe = rows[None]  # [1, n_in, dim]: the rows are a grid of 1 x n_in or n_in x 1
    want = resample_abs_pos_embed(pe, list(new), list(old), 0).numpy().tobytes()

    assert _resampled_f32(pe, old, new, "fma") == want
    monkeypatch.setattr(torchfree, "_round_to_odd", lambda p, c, s: False)
    assert (
        _resampled_f32(pe, old, new, "fma") != want
    )  # the traps are real: rounding the float64 sums as they are gives other bits
