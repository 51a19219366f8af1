"""Sizes, source-grid inference and target resolution: pure shape logic."""

from __future__ import annotations

import pytest

from vitresize.errors import GeometryError, UsageError
from vitresize.resample.conventions import METHODS, resolve_conventions
from vitresize.resample.geometry import Geometry, infer_source_grid, parse_size, resolve_target


@pytest.mark.parametrize(
    ("text", "want"),
    [("384", (384, 384)), ("384x512", (384, 512)), (" 32 X 48 ", (32, 48)), (16, (16, 16)), ((2, 3), (2, 3))],
)
def test_parse_size(text: object, want: tuple[int, int]) -> None:
    assert parse_size(text) == want  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "x", "3x4x5", "-1", "0", "abc", "12.5"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text, option="--img-size")


def test_square_grid_from_tokens() -> None:
    assert infer_source_grid(num_rows=197, prefix_candidates=(1, 0), patch=(16, 16), pos_key="pos_embed") == (
        (14, 14),
        1,
        "tokens",
    )


def test_distilled_and_registers_counted() -> None:
    assert infer_source_grid(num_rows=198, prefix_candidates=(2, 0), patch=(16, 16), pos_key="p")[:2] == ((14, 14), 2)
    assert infer_source_grid(num_rows=201, prefix_candidates=(5, 0), patch=(16, 16), pos_key="p")[:2] == ((14, 14), 5)


def test_no_embed_class_falls_back_to_zero_prefix_rows() -> None:
    assert infer_source_grid(num_rows=196, prefix_candidates=(1, 0), patch=(16, 16), pos_key="p")[:2] == ((14, 14), 0)


def test_non_square_needs_geometry() -> None:
    with pytest.raises(GeometryError, match="pass from_img_size HxW"):
        infer_source_grid(num_rows=7, prefix_candidates=(1, 0), patch=(16, 16), pos_key="pos_embed")


def test_non_square_from_img_size_and_grid() -> None:
    got = infer_source_grid(num_rows=7, prefix_candidates=(1, 0), patch=(16, 16), pos_key="p", from_img_size=(32, 48))
    assert got == ((2, 3), 1, "from_img_size")
    got = infer_source_grid(num_rows=7, prefix_candidates=(1, 0), patch=(16, 16), pos_key="p", from_grid=(2, 3))
    assert got == ((2, 3), 1, "from_grid")


def test_given_geometry_must_explain_the_rows() -> None:
    with pytest.raises(GeometryError, match="needs 25 or 24"):
        infer_source_grid(num_rows=7, prefix_candidates=(1, 0), patch=(8, 8), pos_key="p", from_grid=(4, 6))


def test_metadata_hint_used_only_when_it_fits() -> None:
    assert infer_source_grid(num_rows=25, prefix_candidates=(1, 0), patch=(8, 8), pos_key="p", hint=(4, 6))[:2] == (
        (4, 6),
        1,
    )
    assert infer_source_grid(num_rows=17, prefix_candidates=(1, 0), patch=(8, 8), pos_key="p", hint=(4, 6))[:2] == (
        (4, 4),
        1,
    )


def test_from_img_size_not_divisible() -> None:
    with pytest.raises(UsageError, match="not divisible"):
        infer_source_grid(num_rows=7, prefix_candidates=(1,), patch=(16, 16), pos_key="p", from_img_size=(30, 48))


SRC = Geometry(grid=(14, 14), patch=(16, 16))


def test_resolve_target() -> None:
    assert resolve_target(SRC, img_size=(384, 384)) == Geometry((24, 24), (16, 16))
    assert resolve_target(SRC, img_size=(384, 512), patch=(32, 32)) == Geometry((12, 16), (32, 32))
    assert resolve_target(SRC, patch=(8, 8)) == Geometry((28, 28), (8, 8))  # keeps 224x224
    assert resolve_target(SRC, grid=(10, 20)) == Geometry((10, 20), (16, 16))
    assert resolve_target(SRC, grid=(10, 20), patch=(8, 8)).img_size == (80, 160)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "no target"),
        ({"img_size": (385, 385)}, "not divisible"),
        ({"patch": (15, 15)}, "not divisible"),
        ({"img_size": (384, 384), "grid": (2, 2)}, "either grid or img_size"),
    ],
)
def test_resolve_target_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        resolve_target(SRC, **kwargs)  # type: ignore[arg-type]


def test_conventions() -> None:
    name, pos, basis = resolve_conventions("native", native="torchvision")
    assert name == "torchvision" and pos == METHODS["torchvision"]
    assert basis.interpolation == "bicubic" and basis.antialias
    _, pos, basis = resolve_conventions("timm", native="timm", interpolation="bilinear", antialias=False)
    assert (pos.interpolation, pos.antialias, basis.interpolation, basis.antialias) == (
        "bilinear",
        False,
        "bilinear",
        False,
    )
    _, pos, _ = resolve_conventions("timm", native="timm", interpolation="nearest")
    assert not pos.antialias and pos.align_corners is None
    with pytest.raises(UsageError, match="antialias"):
        resolve_conventions("timm", native="timm", interpolation="area", antialias=True)
    with pytest.raises(UsageError):
        resolve_conventions("bogus", native="timm")
