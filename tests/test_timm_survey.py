"""Survey of timm architectures: a plan either refuses or gives exactly the shapes timm builds at the target.

Each case builds the timm model on the meta device, writes a header-only sparse .safetensors of its state
dict's shapes (the data reads as zeros and is never read by ``plan``), plans a move to twice the default image
size (or to a new patch) and compares every planned shape with the meta model timm builds at that target.
A plan that timm could not load is the one outcome that fails: refusing (a one-line ``VitresizeError``) is fine.

Models whose patch kernel follows a stem (the ResNet hybrids, Hiera) do not state their patch in the weights:
they are refused without ``from_img_size`` and correct with it, and both are asserted here.

Slow (about 50 timm models, built on the meta device; ~25 s):
``make test-slow`` or ``pytest -m slow tests/test_timm_survey.py``.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

import vitresize

pytestmark = pytest.mark.slow

Shapes = dict[str, tuple[int, ...]]

# Hybrids (a CNN under patch_embed.backbone, then a 1x1 or 8x8 projection) and Hiera (a strided 7x7 conv):
# the weights do not say the stride, so a plan without from_img_size must refuse (it used to plan wrong tables).
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
    # Hiera variants vitresize does not match (a 4-d table beside a window table): refused as "no ViT".
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


def _meta_model(name: str, **kwargs: Any) -> Any:
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, **kwargs)


@cache
def _default(name: str) -> tuple[tuple[int, int], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """The default image size and the state dict's (shape, dtype) of ``name`` as timm builds it."""
    model = _meta_model(name)
    size = tuple((model.pretrained_cfg or {}).get("input_size", (3, 224, 224))[1:])
    assert len(size) == 2
    sd = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    return (int(size[0]), int(size[1])), sd


def _target_shapes(name: str, **kwargs: Any) -> Shapes:
    return {k: tuple(v.shape) for k, v in _meta_model(name, **kwargs).state_dict().items()}


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


def _size(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def _plan(path: Path, **kwargs: Any) -> Shapes | vitresize.VitresizeError:
    """The planned shapes, or the refusal (checked to be one non-empty line)."""
    try:
        with vitresize.plan(path, **kwargs) as p:
            return {c.key: tuple(c.new_shape) for c in p.changes}
    except vitresize.VitresizeError as err:
        msg = str(err)
        assert msg.strip(), f"{type(err).__name__} with an empty message"
        assert "\n" not in msg, f"{type(err).__name__} message is not one line: {msg!r}"
        return err


def _mismatches(source: dict[str, tuple[tuple[int, ...], torch.dtype]], planned: Shapes, target: Shapes) -> list[str]:
    """What a strict load of the planned output into the target model would trip over."""
    bad = [f"{k}: planned {list(s)}, timm {target.get(k)}" for k, s in planned.items() if target.get(k) != s]
    for key, (shape, _) in source.items():
        if key not in planned and key in target and target[key] != shape:
            bad.append(f"{key}: left at {list(shape)}, timm {list(target[key])}")
    return bad


def _check(name: str, result: Shapes | vitresize.VitresizeError, **target_kwargs: Any) -> None:
    """A plan (not a refusal) must give exactly timm's shapes for ``name`` built with ``target_kwargs``."""
    if isinstance(result, vitresize.VitresizeError):
        return
    assert result, f"{name}: the plan changes nothing"
    bad = _mismatches(_default(name)[1], result, _target_shapes(name, **target_kwargs))
    assert not bad, f"{name} at {target_kwargs}: " + "; ".join(bad)


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
    if name in STEM_MODELS:
        assert isinstance(result, vitresize.VitresizeError), (
            f"{name}: planned without from_img_size, but the stem's stride is not in the weights"
        )
        assert "stride" in str(result)
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
