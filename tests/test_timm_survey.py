"""Survey of timm architectures: a plan either refuses or gives exactly the shapes timm builds at the target.

Each case builds the timm model on the meta device, writes a header-only sparse .safetensors of its state
dict's shapes (the data reads as zeros and is never read by ``plan``), plans a move to a new image size, patch
or window, and compares every planned shape with the meta model timm builds at that target, as a strict
``load_state_dict`` would: the same keys, each with the target's shape. A plan that timm could not load is the
one outcome that fails: refusing (a one-line ``VitresizeError``; on the command line one ``Error:`` line and
exit code 1 or 2) is fine.

``test_sweep`` is issue 13's sweep: every family vitresize knows of (its smallest timm variant), each moved to a
larger, a smaller and a non-square image, a new patch and (windowed families) a new window, planned with and
without ``from_img_size``. Where timm takes no such argument the target must be refused or change nothing;
where timm cannot build the model at the target it must be refused. A table of what converts and what is
refused is printed at the end of the module (it tells which families still refuse).

Slow (about 75 timm models, some at 6 targets, built on the meta device with their weight init skipped;
~25 s of CPU):
``make test-slow`` or ``pytest -m slow tests/test_timm_survey.py``.
"""

from __future__ import annotations

import contextlib
import json
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import timm
import timm.layers.weight_init
import torch
from typer.testing import CliRunner

import vitresize
from vitresize.cli import app

pytestmark = pytest.mark.slow

Shapes = dict[str, tuple[int, ...]]
Size = tuple[int, int]

# Hybrids (a CNN under patch_embed.backbone, then a 1x1 or 8x8 projection) and Hiera (a strided 7x7 conv): the
# patch is the stem's stride. Where the keys tell it (a timm ResNetV2 / ResNet-D backbone) a plan converts without
# from_img_size; where they do not it must refuse ("stride"). With from_img_size each must convert exactly.
STEM_MODELS = [
    "vit_tiny_r_s16_p8_224",
    "vit_tiny_r_s16_p8_384",
    "vit_small_r26_s32_224",
    "vit_small_r26_s32_384",
    "vit_base_r26_s32_224",
    "vit_base_r50_s16_224",
    "vit_base_r50_s16_384",
    "vit_large_r50_s32_224",
    "vit_large_r50_s32_384",
    "vit_small_resnet26d_224",
    "vit_small_resnet50d_s16_224",
    "vit_base_resnet26d_224",
    "vit_base_resnet50d_224",
    "hiera_tiny_224",
    "hiera_small_224",
    "hiera_base_224",
    "hiera_base_plus_224",
    "hiera_large_224",
    "hiera_huge_224",
]

# Must be refused, with a word of the reason expected in the message.
EXPECT_REFUSED = {
    # Qwen3-VL encoders keep a fixed table and resample it at run time: timm's table does not change size.
    "qwen3_vit_88m_enc": "Qwen3-VL",
    "qwen3_vit_88m_merge": "Qwen3-VL",
    "qwen3_vit_306m_enc": "Qwen3-VL",
    "qwen3_vit_306m_merge": "Qwen3-VL",
    "qwen3_vit_416m_enc": "Qwen3-VL",
    "qwen3_vit_416m_merge": "Qwen3-VL",
    # 2 x 384 = 768 is not a multiple of the 14-pixel patch.
    "vit_so400m_patch14_siglip_384": "not divisible",
    "vit_so400m_patch14_siglip_gap_384": "not divisible",
}

# One or two of each family that is matched and correct; the last group may refuse or match, nothing else.
REPRESENTATIVES = [
    "vit_tiny_patch16_224",  # class token
    "vit_small_patch16_224",
    "vit_base_patch32_224",
    "vit_base_patch16_gap_224",  # no class token, global average pool
    "vit_medium_patch16_reg4_gap_256",  # register tokens, no class token
    "vit_small_patch14_reg4_dinov2",  # register tokens and a class token
    "vit_small_patch14_dinov2",  # 518 = 37 x 14
    "deit_tiny_distilled_patch16_224",  # class + distillation token
    "deit3_small_patch16_224",  # no_embed_class: the table holds the grid only
    "flexivit_small",  # 240 = 15 x 16
    "eva02_tiny_patch14_224",  # eva.py
    "cait_xxs24_224",
    "convit_tiny",
    "vit_base_patch16_siglip_224",
    "vit_so400m_patch14_siglip_224",  # 448 = 32 x 14
    "vit_base_patch16_clip_224",
    "vit_base_patch32_clip_224",
    # Hiera with a fixed table (and a window table) resampled at run time: refused, or nothing to change.
    "hiera_small_abswin_256",
    "hiera_base_abswin_256",
    "hieradet_small",
]

# Known wrong (planned a table timm cannot load, no refusal). strict: an XPASS means it was fixed.
KNOWN_WRONG = {
    "qwen3_vit_88m": (
        "Qwen3-VL classifier without a merger: not recognised as Qwen3-VL, its fixed 48x48 encoder.pos_embed "
        "is resampled to 96x96 but timm keeps 2304 rows at any img_size"
    ),
}

# Plain models moved to a new patch (same image size): pos_embed and the patch kernel must match timm's.
PATCH_CASES = [
    ("vit_tiny_patch16_224", 8),
    ("deit_tiny_distilled_patch16_224", 8),
    ("deit3_small_patch16_224", 32),
    ("flexivit_small", 8),
    ("eva02_tiny_patch14_224", 16),
    ("vit_base_patch16_siglip_224", 14),
    ("cait_xxs24_224", 8),
]

# Issue 13's sweep: the smallest timm variant of each family, moved to each of SWEEP_TARGETS.
SWEEP_MODELS = [
    "vit_base_r50_s16_224",
    "vit_small_r26_s32_224",
    "vit_tiny_r_s16_p8_224",
    "hiera_tiny_224",
    "vit_small_patch16_rope_224",
    "vit_small_patch16_dinov3",
    "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256",
    "beit_base_patch16_224",
    "beitv2_base_patch16_224",
    "samvit_base_patch16",
    "mvitv2_tiny",
    "levit_128s",
    "pit_ti_224",
    "visformer_tiny",
    "crossvit_tiny_240",
    "volo_d1_224",
    "nest_tiny",
    "tnt_s_patch16_224",
    "gcvit_xxtiny",
    "maxvit_tiny_tf_224",
    "vit_relpos_small_patch16_224",
    "naflexvit_base_patch16_gap",
    "xcit_nano_12_p16_224",
    "twins_svt_small",
    "tiny_vit_5m_224",
    "efficientformer_l1",
]
# Families whose attention window is a timm argument (``window_size``) that a plan's ``window`` changes.
WINDOWED = ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "samvit_base_patch16"]
SWEEP_TARGETS = ["larger", "smaller", "non-square", "patch 8", "window 12", "larger, window 12"]
# Image sizes where the rule in _sweep_target does not fit the family (h, w).
SWEEP_SIZES: dict[str, dict[str, Size]] = {
    # Two branches, patches 12 and 16, the second at 224/240 of the image: 480 -> 40 x 12, 448 = 28 x 16.
    "crossvit_tiny_240": {"larger": (480, 480), "smaller": (120, 120), "non-square": (240, 480)},
}

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _no_init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
    return tensor


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Weight init draws values a meta tensor does not have (most of a meta build's time, decomposed op by op);
    shapes never depend on it."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(timm.layers.weight_init, "_trunc_normal_", _no_init))
        for name in (
            "uniform_",
            "normal_",
            "trunc_normal_",
            "constant_",
            "ones_",
            "zeros_",
            "eye_",
            "dirac_",
            "xavier_uniform_",
            "xavier_normal_",
            "kaiming_uniform_",
            "kaiming_normal_",
            "orthogonal_",
        ):
            stack.enter_context(mock.patch.object(torch.nn.init, name, _no_init))
        yield


def _meta_model(name: str, **kwargs: Any) -> Any:
    with warnings.catch_warnings(), _skip_weight_init(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, **kwargs)


@cache
def _default(name: str) -> tuple[Size, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """The default image size and the state dict's (shape, dtype) of ``name`` as timm builds it."""
    model = _meta_model(name)
    size = tuple((model.pretrained_cfg or {}).get("input_size", (3, 224, 224))[1:])
    assert len(size) == 2
    sd = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    return (int(size[0]), int(size[1])), sd


@dataclass(frozen=True)
class Truth:
    """What timm builds at a target: ``shapes``, or why it builds nothing (``no_kwarg``: it takes no such
    argument; else it cannot build the model there)."""

    shapes: Shapes | None
    why: str = ""
    no_kwarg: bool = False


@cache
def _truth(name: str, kwargs: tuple[tuple[str, Any], ...]) -> Truth:
    try:
        model = _meta_model(name, **dict(kwargs))
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            return Truth(None, f"timm takes no {', '.join(k for k, _ in kwargs)}", no_kwarg=True)
        return Truth(None, f"timm cannot build it: {type(e).__name__}: {e}")
    except Exception as e:  # timm's own checks: AssertionError, ValueError, RuntimeError ...
        return Truth(None, f"timm cannot build it: {type(e).__name__}: {e}")
    return Truth({k: tuple(v.shape) for k, v in model.state_dict().items()})


def _write_sparse(sd: dict[str, tuple[tuple[int, ...], torch.dtype]], path: Path) -> None:
    """A valid .safetensors whose data is a hole: the header is all ``plan`` reads."""
    header: dict[str, Any] = {}
    offset = 0
    for key, (shape, dtype) in sd.items():
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


@pytest.fixture(scope="module")
def survey_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("timm_survey")


@pytest.fixture
def sparse(survey_dir: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``sparse(name)`` -> the path of ``name``'s sparse checkpoint, deleted after the case."""
    made: list[Path] = []

    def _make(name: str) -> Path:
        path = survey_dir / f"{name}.safetensors"
        _write_sparse(_default(name)[1], path)
        made.append(path)
        return path

    yield _make
    for path in made:
        path.unlink(missing_ok=True)


def _size(hw: Size) -> str:
    return f"{hw[0]}x{hw[1]}"


def _plan(path: Path, **kwargs: Any) -> Shapes | vitresize.VitresizeError:
    """The planned shapes, or the refusal (checked to be one non-empty line)."""
    try:
        with vitresize.plan(path, **kwargs) as p:
            planned = {c.key: tuple(c.new_shape) for c in p.changes}
            assert len(planned) == len(p.changes), f"a key changed twice: {[c.key for c in p.changes]}"
            return planned
    except vitresize.VitresizeError as err:
        msg = str(err)
        assert msg.strip(), f"{type(err).__name__} with an empty message"
        assert "\n" not in msg, f"{type(err).__name__} message is not one line: {msg!r}"
        assert err.exit_code in (1, 2), f"{type(err).__name__} exit code {err.exit_code}"
        return err


def _mismatches(source: dict[str, tuple[tuple[int, ...], torch.dtype]], planned: Shapes, target: Shapes) -> list[str]:
    """What a strict load of the planned output into the target model would trip over."""
    bad = [f"{k}: planned, but not in the source" for k in planned if k not in source]
    out = {k: planned.get(k, shape) for k, (shape, _) in source.items()}
    for key, shape in out.items():
        if key not in target:
            bad.append(f"{key}: unexpected (timm's model at the target has no such key)")
        elif target[key] != shape:
            how = "planned" if key in planned else "left at"
            bad.append(f"{key}: {how} {list(shape)}, timm {list(target[key])}")
    bad += [f"{k}: missing (timm's model at the target has it)" for k in target if k not in out]
    return bad


def _judge(name: str, result: Shapes | vitresize.VitresizeError, truth: Truth) -> tuple[str, str]:
    """``(outcome, what is wrong)`` of one plan against timm's model at the target."""
    if isinstance(result, vitresize.VitresizeError):
        return "ref", ""
    if truth.shapes is None:
        if truth.no_kwarg and not result:
            return "same", ""
        return "WRONG", f"planned {result}, but {truth.why}"
    bad = _mismatches(_default(name)[1], result, truth.shapes)
    if bad:
        return "WRONG", "; ".join(bad)
    return ("conv" if result else "same"), ""


def _check(name: str, result: Shapes | vitresize.VitresizeError, **target_kwargs: Any) -> None:
    """A plan (not a refusal) must give exactly timm's shapes for ``name`` built with ``target_kwargs`` (where
    timm takes no such argument: change nothing)."""
    outcome, why = _judge(name, result, _truth(name, tuple(sorted(target_kwargs.items()))))
    assert outcome != "WRONG", f"{name} at {target_kwargs}: {why}"


def _known_wrong(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)


_DOUBLE_CASES = [
    *STEM_MODELS,
    *EXPECT_REFUSED,
    *REPRESENTATIVES,
    *(pytest.param(n, marks=_known_wrong(r)) for n, r in KNOWN_WRONG.items()),
]


@pytest.mark.parametrize("name", _DOUBLE_CASES)
def test_double_img_size_refused_or_exact(name: str, sparse: Any) -> None:
    path = sparse(name)
    size, _ = _default(name)
    target = (2 * size[0], 2 * size[1])
    result = _plan(path, img_size=_size(target))
    _check(name, result, img_size=target)
    if name in STEM_MODELS and isinstance(result, vitresize.VitresizeError):
        assert "stride" in str(result), f"{name}: refused, but not for the stem's unknown stride: {result}"
    if name in EXPECT_REFUSED:
        assert isinstance(result, vitresize.VitresizeError), f"{name}: not refused"
        assert EXPECT_REFUSED[name] in str(result)


@pytest.mark.parametrize("name", STEM_MODELS)
def test_stem_models_exact_with_from_img_size(name: str, sparse: Any) -> None:
    path = sparse(name)
    size, _ = _default(name)
    target = (2 * size[0], 2 * size[1])
    result = _plan(path, img_size=_size(target), from_img_size=_size(size))
    assert not isinstance(result, vitresize.VitresizeError), f"{name}: refused even with from_img_size: {result}"
    assert any(k.endswith("pos_embed") for k in result), result
    _check(name, result, img_size=target)
    # A new patch is refused: the kernel after a stem is not the patch.
    assert isinstance(_plan(path, patch=8), vitresize.VitresizeError), f"{name}: a new patch was not refused"


@pytest.mark.parametrize(("name", "patch"), PATCH_CASES)
def test_new_patch_refused_or_exact(name: str, patch: int, sparse: Any) -> None:
    path = sparse(name)
    result = _plan(path, patch=patch)
    _check(name, result, patch_size=patch)
    if not isinstance(result, vitresize.VitresizeError):
        assert any(k.endswith("pos_embed") for k in result), result
        assert any(k.startswith("patch_embed") for k in result), result


# ---------------------------------------------------------------------------------------------------- the sweep


def _sweep_target(name: str, label: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(plan's keyword arguments, timm's)`` for moving ``name`` to ``label`` (one of SWEEP_TARGETS)."""
    (h, w), _ = _default(name)
    sizes = {
        "larger": (384, 384) if max(h, w) < 384 else (2 * h, 2 * w),
        "smaller": (160, 160) if max(h, w) <= 256 else (h // 2, w // 2),
        "non-square": (h, 320) if w == 224 else (h, round(w * 10 / 7 / 32) * 32),
        **SWEEP_SIZES.get(name, {}),
    }
    if label in sizes:
        return {"img_size": _size(sizes[label])}, {"img_size": sizes[label]}
    if label == "patch 8":
        return {"patch": 8}, {"patch_size": 8}
    if label == "window 12":
        return {"window": 12}, {"window_size": 12}
    assert label == "larger, window 12", label
    return {"img_size": _size(sizes["larger"]), "window": 12}, {"img_size": sizes["larger"], "window_size": 12}


_SWEEP_CASES = [
    (name, label) for name in SWEEP_MODELS for label in SWEEP_TARGETS if "window" not in label or name in WINDOWED
]

_SWEEP: dict[tuple[str, str], tuple[str, str]] = {}
"""(model, target) -> the outcome planned without and with ``from_img_size``: ``conv`` (converted, exactly
timm's shapes), ``same`` (nothing to change, and timm's shapes are the source's), ``ref`` (refused), ``WRONG``."""
_REFUSALS: dict[tuple[str, str], str] = {}
_TRUTH_NOTES: dict[tuple[str, str], str] = {}


def _cli_refuses(path: Path, out: Path, plan_kwargs: dict[str, Any], err: vitresize.VitresizeError) -> None:
    """The command line refuses the same case with one ``Error:`` line on stderr and the error's exit code."""
    flags = [f"--{k.replace('_', '-')}" if i % 2 == 0 else str(v) for k, v in plan_kwargs.items() for i in (0, 1)]
    res = CliRunner().invoke(app, ["convert", str(path), str(out), *flags, "--dry-run"])
    assert res.exit_code == err.exit_code, (res.exit_code, err, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == "", (res.stdout, res.stderr)
    assert not out.exists()


@pytest.mark.parametrize(("name", "label"), _SWEEP_CASES)
def test_sweep(name: str, label: str, sparse: Any, survey_dir: Path) -> None:
    """Issue 13: every target of every family is converted exactly as timm builds it there, or refused."""
    path = sparse(name)
    size, _ = _default(name)
    plan_kwargs, timm_kwargs = _sweep_target(name, label)
    truth = _truth(name, tuple(sorted(timm_kwargs.items())))
    if truth.shapes is None:
        _TRUTH_NOTES[name, label] = "no kwarg" if truth.no_kwarg else "timm fails"
    plain = _plan(path, **plan_kwargs)
    given = _plan(path, **plan_kwargs, from_img_size=_size(size))
    outcomes, wrong = [], []
    for how, result in (("", plain), (f" with from_img_size={_size(size)}", given)):
        outcome, why = _judge(name, result, truth)
        outcomes.append(outcome)
        if why:
            wrong.append(f"{name} -> {plan_kwargs}{how}: {why}")
    _SWEEP[name, label] = (outcomes[0], outcomes[1])
    refusals = [f"{type(r).__name__}: {r}" for r in (plain, given) if isinstance(r, vitresize.VitresizeError)]
    if refusals:
        _REFUSALS[name, label] = " / with from_img_size: ".join(dict.fromkeys(refusals)).replace(str(path), "SRC")
    assert not wrong, "\n".join(wrong)
    if isinstance(plain, vitresize.VitresizeError):
        _cli_refuses(path, survey_dir / f"{name}.out.safetensors", plan_kwargs, plain)


# Refusals that stay refusals, to hold the command line's contract (one Error: line, exit 1 or 2) whatever the
# sweep's families come to convert.
CLI_REFUSED = [
    ("vit_tiny_patch16_224", ["--window", "12"], "window"),  # no window to change
    ("swin_tiny_patch4_window7_224", ["--img-size", "226"], "divisible"),  # 226 is no multiple of the 4 patch
    ("vit_so400m_patch14_siglip_384", ["--img-size", "768"], "divisible"),
    ("qwen3_vit_88m_enc", ["--img-size", "512"], "Qwen3-VL"),
    ("vit_base_r50_s16_224", ["--patch", "8", "--from-img-size", "224"], "patch"),  # the kernel after a stem
]


@pytest.mark.parametrize(("name", "flags", "needle"), CLI_REFUSED)
def test_cli_refuses_with_one_error_line(
    name: str, flags: list[str], needle: str, sparse: Any, survey_dir: Path
) -> None:
    path = sparse(name)
    out = survey_dir / f"{name}.out.safetensors"
    res = CliRunner().invoke(app, ["convert", str(path), str(out), *flags])
    assert res.exit_code in (1, 2), (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert needle in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert not out.exists()


def _cell(outcomes: tuple[str, str], note: str | None) -> str:
    plain, given = outcomes
    text = plain if plain == given else f"{plain}|{given}"
    return f"{text} ({note})" if note else text


class _SweepTable:
    """A plugin that prints the sweep's table in pytest's terminal summary (shown with -q too)."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if _SWEEP:
            terminalreporter.section("vitresize sweep (issue 13)", sep="-")
            for line in _sweep_lines():
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _sweep_table(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    plugins = request.config.pluginmanager
    if _SWEEP and not any(isinstance(p, _SweepTable) for p in plugins.get_plugins()):
        plugins.register(_SweepTable())


def _sweep_lines() -> list[str]:
    lines = [
        "cells: planned without from_img_size|with it (one word when both agree): conv = converted to exactly "
        "timm's shapes, same = nothing to change (timm's shapes are the source's), ref = refused, WRONG = a "
        "checkpoint timm cannot load; (no kwarg) = timm takes no such argument, (timm fails) = timm cannot build it",
    ]
    width = max(len(n) for n, _ in _SWEEP)
    cols = [t for t in SWEEP_TARGETS if any(label == t for _, label in _SWEEP)]
    cells = {k: _cell(v, _TRUTH_NOTES.get(k)) for k, v in _SWEEP.items()}
    col_w = {t: max([len(t)] + [len(c) for (_, label), c in cells.items() if label == t]) for t in cols}
    lines.append(" | ".join([f"{'model':{width}}"] + [f"{t:{col_w[t]}}" for t in cols]))
    for name in dict.fromkeys(n for n, _ in _SWEEP):
        row = [f"{name:{width}}"] + [f"{cells.get((name, t), '-'):{col_w[t]}}" for t in cols]
        lines.append(" | ".join(row))
    counts: dict[str, int] = {}
    for outcomes in _SWEEP.values():
        best = next(o for o in ("WRONG", "conv", "same", "ref") if o in outcomes)
        counts[best] = counts.get(best, 0) + 1
    lines.append("pairs (best of the two plans): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    lines.append("refusals:")
    lines += [f"  {n} {label}: {why}" for (n, label), why in _REFUSALS.items()]
    return lines
