"""Resize a patch-embedding kernel ``[D, C, ph, pw]`` to a new patch size."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conventions import Convention
from .geometry import Size
from .pos_embed import check_dtype, memory_guard

__all__ = ["resample_patch_embed"]


def _resize_matrix(old: Size, new: Size, basis: Convention, device: torch.device) -> torch.Tensor:
    """``B`` of shape ``[new_h*new_w, old_h*old_w]``: column j is the resize of the j-th unit patch."""
    n_old = old[0] * old[1]
    eye = torch.eye(n_old, device=device, dtype=torch.float32).reshape(n_old, 1, old[0], old[1])
    cols = F.interpolate(
        eye,
        size=tuple(new),
        mode=basis.interpolation,
        antialias=basis.antialias,
        align_corners=basis.align_corners,
    )
    return cols.squeeze(1).permute(1, 2, 0).reshape(new[0] * new[1], n_old)


def resample_patch_embed(
    weight: torch.Tensor,
    new_size: Size,
    *,
    basis: Convention,
    method: str = "pi",
) -> torch.Tensor:
    """Resize a conv patch-embedding kernel, in float32, cast back to the input dtype.

    ``method="pi"`` is FlexiViT's pseudo-inverse resize: with ``B`` the resize operator of an image patch,
    it solves ``B^T w_new = w_old`` in the least-squares sense, so a token computed from a patch resized with
    ``B`` is unchanged (exactly so when the patch grows). It performs the same operations as
    ``timm.layers.resample_patch_embed`` (float32 basis from ``F.interpolate``, ``torch.linalg.pinv``, one
    matmul) and equals it bit for bit. ``method="interp"`` interpolates the kernel itself (what EVA/ViTDet
    scripts do); it does not preserve tokens and is offered for comparison.

    Args:
        weight: ``[D, C, ph, pw]`` (OIHW).
        new_size: the new patch size ``(h, w)``.
        basis: the resize convention (timm: bicubic with antialias).
        method: ``"pi"`` or ``"interp"``.

    Returns:
        ``[D, C, new_h, new_w]`` in the input dtype (the input itself when the size is unchanged).

    Raises:
        ValueError: not a 4-D kernel, not float16, bfloat16, float32 or float64, or an unknown ``method``.
        VitresizeError: out of memory.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a kernel of shape [D, C, ph, pw], got {list(weight.shape)}")
    check_dtype(weight, "the patch kernel")
    old_size: Size = (int(weight.shape[-2]), int(weight.shape[-1]))
    if old_size == tuple(new_size):
        return weight
    with memory_guard(f"a {list(weight.shape)} patch kernel to {new_size[0]}x{new_size[1]}"):
        return _resample(weight, old_size, new_size, basis, method)


def _resample(weight: torch.Tensor, old_size: Size, new_size: Size, basis: Convention, method: str) -> torch.Tensor:
    orig_dtype = weight.dtype
    if method == "interp":
        interp = F.interpolate(
            weight.float(),
            size=tuple(new_size),
            mode=basis.interpolation,
            antialias=basis.antialias,
            align_corners=basis.align_corners,
        )
        return interp.to(orig_dtype)
    if method != "pi":
        raise ValueError(f"unknown patch method {method!r}; use 'pi' or 'interp'")
    pinv = torch.linalg.pinv(_resize_matrix(old_size, new_size, basis, weight.device))
    out_ch, in_ch = weight.shape[:2]
    flat = weight.reshape(out_ch, in_ch, -1).to(torch.float32)
    out: torch.Tensor = (flat @ pinv).reshape(out_ch, in_ch, new_size[0], new_size[1])
    return out.to(orig_dtype)
