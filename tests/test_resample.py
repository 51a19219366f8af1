"""The tensor functions, bit for bit against the libraries' own (timm, torchvision)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torchvision.models.vision_transformer import interpolate_embeddings

from vitresize.resample.conventions import METHODS, PATCH_BASIS, Convention
from vitresize.resample.patch_embed import resample_patch_embed as our_patch
from vitresize.resample.pos_embed import resample_pos_embed as our_pos

GRIDS = [((14, 14), (24, 24)), ((14, 14), (7, 7)), ((4, 6), (6, 4)), ((2, 3), (5, 5)), ((16, 16), (16, 8))]


def _table(prefix: int, grid: tuple[int, int], dim: int = 12, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(prefix * 100 + grid[0] * 10 + grid[1])
    return torch.randn(1, prefix + grid[0] * grid[1], dim, generator=g).to(dtype)


@pytest.mark.parametrize(("old", "new"), GRIDS)
@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
def test_pos_embed_equals_timm(old: tuple[int, int], new: tuple[int, int], prefix: int) -> None:
    pe = _table(prefix, old)
    want = resample_abs_pos_embed(pe, new_size=list(new), old_size=list(old), num_prefix_tokens=prefix)
    got = our_pos(pe, old_grid=old, new_grid=new, num_prefix_tokens=prefix, convention=METHODS["timm"])
    assert torch.equal(got, want)
    assert torch.equal(got[:, :prefix], pe[:, :prefix])


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [True, False])
def test_pos_embed_overrides_equal_timm(mode: str, antialias: bool) -> None:
    pe = _table(1, (7, 7))
    want = resample_abs_pos_embed(pe, [12, 10], [7, 7], num_prefix_tokens=1, interpolation=mode, antialias=antialias)
    got = our_pos(pe, old_grid=(7, 7), new_grid=(12, 10), num_prefix_tokens=1, convention=Convention(mode, antialias))
    assert torch.equal(got, want)


@pytest.mark.parametrize(("old", "new"), [(7, 12), (14, 24), (14, 7), (4, 4)])
def test_pos_embed_equals_torchvision(old: int, new: int) -> None:
    pe = _table(1, (old, old))
    state = OrderedDict({"encoder.pos_embedding": pe.clone()})
    want = interpolate_embeddings(image_size=new * 16, patch_size=16, model_state=state)["encoder.pos_embedding"]
    got = our_pos(pe, old_grid=(old, old), new_grid=(new, new), num_prefix_tokens=1, convention=METHODS["torchvision"])
    assert torch.equal(got, want)


def test_pos_embed_deit_convention() -> None:
    """DeiT main.py: bicubic, align_corners=False, no antialias, on the [1, D, n, n] grid."""
    pe = _table(2, (14, 14))
    grid = pe[:, 2:].reshape(-1, 14, 14, 12).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
    want = torch.cat([pe[:, :2], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    got = our_pos(pe, old_grid=(14, 14), new_grid=(24, 24), num_prefix_tokens=2, convention=METHODS["deit"])
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pos_embed_keeps_dtype_and_prefix_bits(dtype: torch.dtype) -> None:
    pe = _table(1, (4, 4), dtype=dtype)
    got = our_pos(pe, old_grid=(4, 4), new_grid=(6, 6), num_prefix_tokens=1, convention=METHODS["timm"])
    want = resample_abs_pos_embed(pe, [6, 6], [4, 4], num_prefix_tokens=1)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(got[:, :1].view(torch.int16), pe[:, :1].view(torch.int16))


def test_pos_embed_same_grid_is_identity_and_bad_shape_raises() -> None:
    pe = _table(1, (4, 6))
    assert our_pos(pe, old_grid=(4, 6), new_grid=(4, 6), num_prefix_tokens=1, convention=METHODS["timm"]) is pe
    # timm's early-out skips an equal-token-count change to a square grid; we resample it.
    moved = our_pos(pe, old_grid=(4, 6), new_grid=(6, 4), num_prefix_tokens=1, convention=METHODS["timm"])
    assert not torch.equal(moved, pe)
    with pytest.raises(ValueError, match="expected 1 prefix"):
        our_pos(pe, old_grid=(5, 5), new_grid=(6, 6), num_prefix_tokens=1, convention=METHODS["timm"])


@pytest.mark.parametrize("new", [(16, 16), (8, 8), (14, 14), (12, 6), (4, 4)])
def test_patch_embed_pi_equals_timm(new: tuple[int, int]) -> None:
    w = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    want = resample_patch_embed(w, list(new))
    assert torch.equal(our_patch(w, new, basis=PATCH_BASIS), want)


@pytest.mark.parametrize(("mode", "antialias"), [("bilinear", False), ("bicubic", False), ("bilinear", True)])
def test_patch_embed_basis_overrides_equal_timm(mode: str, antialias: bool) -> None:
    w = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    want = resample_patch_embed(w, [12, 12], interpolation=mode, antialias=antialias)
    basis = Convention(mode, antialias=antialias, align_corners=False)
    assert torch.equal(our_patch(w, (12, 12), basis=basis), want)


def test_patch_embed_pi_keeps_tokens_when_upsampling() -> None:
    """FlexiViT's property: <resize(x), PI(w)> == <x, w> when the patch grows."""
    w = torch.randn(5, 3, 8, 8, dtype=torch.float64).float()
    x = torch.randn(2, 3, 8, 8)
    x_big = F.interpolate(x, size=(12, 12), mode="bicubic", antialias=True)
    w_big = our_patch(w, (12, 12), basis=PATCH_BASIS)
    before = torch.einsum("bchw,ochw->bo", x, w)
    after = torch.einsum("bchw,ochw->bo", x_big, w_big)
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_patch_embed_interp_and_dtypes() -> None:
    w = torch.randn(4, 3, 8, 8)
    got = our_patch(w, (4, 4), basis=PATCH_BASIS, method="interp")
    assert torch.equal(got, F.interpolate(w, size=(4, 4), mode="bicubic", antialias=True, align_corners=False))
    for dtype in (torch.float16, torch.bfloat16):
        out = our_patch(w.to(dtype), (12, 12), basis=PATCH_BASIS)
        assert out.dtype == dtype
        assert torch.equal(out, resample_patch_embed(w.to(dtype), [12, 12]))
    assert our_patch(w, (8, 8), basis=PATCH_BASIS) is w
    with pytest.raises(ValueError, match="unknown patch method"):
        our_patch(w, (4, 4), basis=PATCH_BASIS, method="magic")
