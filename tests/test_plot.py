"""vitresize.plot draws readable PNG/SVG/PDF pictures of position tables and patch kernels, from numpy only.

The PNGs are read back with Pillow: a plausible size (wider with more columns), not blank. Odd inputs (NaN, Inf,
zero rows, a 1x1 grid, a 1-pixel kernel, D == 1) draw without error; user mistakes raise one-line UsageErrors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from vitresize.errors import MissingDependencyError, UsageError
from vitresize.plot import Bars, Picture, draw, kernel_tiles, similarity_mosaic

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

RNG = np.random.default_rng(0)


def _table(h: int, w: int, d: int = 16) -> np.ndarray:
    return RNG.normal(size=(h, w, d)).astype(np.float32)


def _kernel(o: int = 16, c: int = 3, k: int = 4) -> np.ndarray:
    return RNG.normal(size=(o, c, k, k)).astype(np.float32)


def _bars() -> Bars:
    return Bars(
        ("converted", "reference (timm)", "bilinear"),
        {"top-1 agreement %": (99.0, 98.0, float("nan")), "cosine (pooled) x100": (99.5, 99.1, -3.0)},
        highlight=0,
    )


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def _assert_drawn(path: Path) -> np.ndarray:
    pixels = _read(path)
    h, w, _ = pixels.shape
    assert 300 < w < 4000 and 300 < h < 4000, (w, h)
    assert pixels.std() > 20, "the picture is nearly blank"
    packed = pixels[::3, ::3].astype(np.int64) @ np.array([65536, 256, 1])  # one int per colour, every 9th pixel
    assert len(np.unique(packed)) > 50, "too few colours"
    assert not list(path.parent.glob(".*vitresize-tmp")), "a temp file was left behind"
    return pixels


def test_one_column_and_two_columns_and_bars(tmp_path: Path) -> None:
    before = Picture("before: a.pth, 4x4 grid, patch 8", _table(4, 4), _kernel())
    after = Picture("after: b.pth, 6x6 grid, patch 8", _table(6, 6), _kernel())
    one, two, check = tmp_path / "one.png", tmp_path / "two.png", tmp_path / "check.png"
    draw(one, [before], title="inspect")
    draw(two, [before, after], title="convert")
    draw(check, [before, after], title="check", bars=_bars())
    w1, w2, w3 = (_assert_drawn(p).shape[1] for p in (one, two, check))
    h2, h3 = _read(two).shape[0], _read(check).shape[0]
    assert w2 > w1 * 1.5, (w1, w2)
    assert w3 >= w2 and h3 > h2  # the bars row adds height


def test_missing_table_and_kernel_get_a_panel(tmp_path: Path) -> None:
    out = tmp_path / "missing.png"
    pictures = [Picture("relative positions", None, _kernel(c=1)), Picture("no kernel", _table(3, 5), None)]
    draw(out, pictures, title="missing")
    _assert_drawn(out)
    draw(out, [Picture("nothing at all", None, None)], title="empty", bars=_bars())  # replaces the file
    _assert_drawn(out)


def test_large_grid_is_sampled_and_non_square_grid_keeps_its_shape() -> None:
    big = similarity_mosaic(_table(24, 24))
    assert big.rows == big.cols == (0, 3, 7, 10, 13, 16, 20, 23)
    assert big.grid == (24, 24)
    wide = similarity_mosaic(_table(6, 10))
    assert wide.rows == tuple(range(6)) and len(wide.cols) == 8 and wide.cols[0] == 0 and wide.cols[-1] == 9
    gap = wide.gap
    assert wide.image.shape == (6 * 6 + 5 * gap, 8 * 10 + 7 * gap)
    # tile (0, 0) is position (0, 0)'s similarity to every row: 1 on itself, all within [-1, 1]
    tile = wide.image[:6, :10]
    assert tile[0, 0] == pytest.approx(1.0)
    assert np.nanmin(wide.image) >= -1.0 and np.nanmax(wide.image) <= 1.0 + 1e-12


def test_big_and_non_square_grids_draw(tmp_path: Path) -> None:
    out = tmp_path / "grids.png"
    draw(out, [Picture("24x24", _table(24, 24), _kernel(40)), Picture("6x10", _table(6, 10), None)], title="grids")
    _assert_drawn(out)


def test_non_finite_and_degenerate_inputs_do_not_crash(tmp_path: Path) -> None:
    table = _table(5, 5)
    table[0, 0] = np.nan
    table[1, 1] = np.inf
    table[2, 2] = 0.0
    kernel = _kernel(8)
    kernel[0, 0, 0, 0] = np.nan
    mosaic = similarity_mosaic(table)
    assert mosaic.bad_rows == 3 and mosaic.invalid.any()
    tiles = kernel_tiles(kernel)
    assert tiles.count == 6 and "1 of 8 filters non-finite" in tiles.caption  # 7 centred filters: rank 6
    assert np.isfinite(tiles.image).all() and tiles.image.min() >= 0 and tiles.image.max() <= 1
    pictures = [
        Picture("NaN, Inf and zero rows", table, kernel),
        Picture("1x1 grid, 1-pixel kernel", _table(1, 1), _kernel(4, 3, 1)),
        Picture("D == 1, one filter", _table(3, 2, d=1), _kernel(1, 3, 2)),
        Picture("all NaN", np.full((2, 2, 4), np.nan, np.float32), np.full((2, 3, 2, 2), np.inf, np.float32)),
        Picture("zeros, empty", np.zeros((2, 2, 4), np.float32), np.zeros((0, 3, 2, 2), np.float32)),
    ]
    out = tmp_path / "odd.png"
    draw(out, pictures, title="odd", bars=Bars(("a", "b"), {"x": (float("inf"), float("nan"))}, highlight=None))
    assert _read(out).std() > 20


def test_pca_of_rgb_kernels_and_grey_channel_mean() -> None:
    rgb = kernel_tiles(_kernel(64, 3, 4))
    assert rgb.count == 28 and "principal components" in rgb.caption
    assert rgb.image.shape == (4 * 4 + 3, 7 * 4 + 6, 3)  # 4 rows of 7 tiles, 1-pixel gaps
    grey = kernel_tiles(_kernel(10, 2, 4))
    assert grey.count == 10 and "mean of 2 channels" in grey.caption
    tile = grey.image[:4, :4]
    assert np.allclose(tile[..., 0], tile[..., 1]) and np.allclose(tile[..., 0], tile[..., 2])


@pytest.mark.parametrize("suffix", [".svg", ".pdf", ".PNG"])
def test_other_formats(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"plot{suffix}"
    draw(out, [Picture("a", _table(2, 2), _kernel(4))], title="formats")
    head = out.read_bytes()[:64]
    assert {".svg": b"<?xml", ".pdf": b"%PDF", ".PNG": b"\x89PNG"}[suffix] in head


def test_bad_suffix_and_missing_folder_raise_usage_errors(tmp_path: Path) -> None:
    picture = [Picture("a", _table(2, 2), None)]
    with pytest.raises(UsageError, match=r"\.png, \.svg, \.pdf") as err:
        draw(tmp_path / "plot.jpg", picture, title="x")
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="does not exist") as err:
        draw(tmp_path / "nowhere" / "plot.png", picture, title="x")
    assert "\n" not in str(err.value)
    folder = tmp_path / "dir.png"
    folder.mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        draw(folder, picture, title="x")
    assert list(tmp_path.iterdir()) == [folder]


def test_bad_shapes_and_bars_raise_usage_errors(tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    with pytest.raises(UsageError, match=r"\[H, W, D\]"):
        draw(out, [Picture("flat", np.zeros((4, 16), np.float32), None)], title="x")
    with pytest.raises(UsageError, match=r"\[O, C, kh, kw\]"):
        draw(out, [Picture("flat", None, np.zeros((4, 16), np.float32))], title="x")
    with pytest.raises(UsageError, match="one per label"):
        draw(out, [], title="x", bars=Bars(("a", "b"), {"m": (1.0,)}))
    with pytest.raises(UsageError, match="not a label index"):
        draw(out, [], title="x", bars=Bars(("a",), {"m": (1.0,)}, highlight=3))
    with pytest.raises(UsageError, match="nothing to plot"):
        draw(out, [], title="x")
    assert not out.exists()


def test_missing_matplotlib_names_the_pip_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match="pip install matplotlib") as err:
        draw(tmp_path / "plot.png", [Picture("a", _table(2, 2), None)], title="x")
    assert "--plot" in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        draw(tmp_path / "plot.png", [Picture("a", _table(2, 2), None)], title="x")
    assert not list(tmp_path.iterdir())


def test_no_pyplot_figures_leak(tmp_path: Path) -> None:
    pyplot = pytest.importorskip("matplotlib.pyplot")
    before = list(pyplot.get_fignums())
    draw(tmp_path / "plot.png", [Picture("a", _table(3, 3), _kernel(4))], title="x", bars=_bars())
    assert pyplot.get_fignums() == before == []
