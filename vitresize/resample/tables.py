"""Relative position tables: 2-D bias tables (BEiT, Swin, GCViT, MaxViT), 1-D tables (SAM), and the index
buffers that read them.

Hand-written, because the functions that do this live in timm (a test oracle, not a dependency of vitresize):
:func:`resize_rel_bias` is timm's ``resize_rel_pos_bias_table`` (the BEiT fine-tuning recipe: the old offsets
spread on a geometric progression, sampled linearly at the new integer offsets), step for step, so that it
gives timm's values; :func:`relative_position_index` is timm's ``gen_relative_position_index``.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Size
from .pos_embed import check_dtype, memory_guard

__all__ = ["relative_position_index", "resize_rel_bias", "resize_rel_pos_1d"]


def _offsets(src: int, dst: int) -> list[float]:
    """The ``src`` source offsets spread so that the outermost lands near ``dst // 2`` (timm's ``_calc``)."""
    left, right = 1.01, 1.5
    q = left
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = 1 * (1.0 - q ** (src // 2)) / (1.0 - q)
        if gp > dst // 2:
            right = q
        else:
            left = q
    dis = []
    cur = 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0] + dis


def _interp_linear(
    points: tuple[torch.Tensor, torch.Tensor], values: torch.Tensor, at: list[torch.Tensor]
) -> torch.Tensor:
    """Bilinear interpolation on a rectilinear grid, as timm's ``RegularGridInterpolator`` computes it."""
    idxs, dists, overalls = [], [], []
    for p, x in zip(points, at, strict=True):
        idx_right = torch.bucketize(x, p)
        idx_right[idx_right >= p.shape[0]] = p.shape[0] - 1
        idx_left = (idx_right - 1).clamp(0, p.shape[0] - 1)
        dist_left = x - p[idx_left]
        dist_right = p[idx_right] - x
        dist_left[dist_left < 0] = 0.0
        dist_right[dist_right < 0] = 0.0
        both_zero = (dist_left == 0) & (dist_right == 0)
        dist_left[both_zero] = dist_right[both_zero] = 1.0
        idxs.append((idx_left, idx_right))
        dists.append((dist_left, dist_right))
        overalls.append(dist_left + dist_right)
    numerator: torch.Tensor | float = 0.0
    for onoff in itertools.product([0, 1], repeat=2):
        a = [idx[o] for o, idx in zip(onoff, idxs, strict=True)]
        b = [dist[1 - o] for o, dist in zip(onoff, dists, strict=True)]
        numerator = numerator + values[tuple(a)] * torch.prod(torch.stack(b), dim=0)
    return numerator / torch.prod(torch.stack(overalls), dim=0)


def _bspline_basis(knots: np.ndarray, x: np.ndarray, k: int = 3) -> np.ndarray:
    """``B[i, j]``: the j-th B-spline of degree ``k`` on ``knots`` at ``x[i]`` (Cox-de Boor, float64)."""
    n = len(knots) - k - 1
    b = np.zeros((len(x), len(knots) - 1))
    for j in range(len(knots) - 1):
        inside = (knots[j] <= x) & (x < knots[j + 1])
        b[:, j] = inside
    last = np.nonzero(knots < knots[-1])[0][-1]  # the right end belongs to the last non-empty interval
    b[x == knots[-1], last] = 1.0
    for d in range(1, k + 1):
        nxt = np.zeros((len(x), len(knots) - 1 - d))
        for j in range(len(knots) - 1 - d):
            left = knots[j + d] - knots[j]
            right = knots[j + d + 1] - knots[j + 1]
            if left > 0:
                nxt[:, j] += (x - knots[j]) / left * b[:, j]
            if right > 0:
                nxt[:, j] += (knots[j + d + 1] - x) / right * b[:, j + 1]
        b = nxt
    return b[:, :n]


def _spline_matrix(src: list[float], dst: np.ndarray) -> np.ndarray:
    """``M`` with ``M @ values`` = the cubic interpolating spline of ``values`` at ``src``, evaluated at ``dst``
    (clamped to ``src``'s range): FITPACK's (``interp2d``, ``RectBivariateSpline`` with ``s=0``) knots, the data
    points but the second and the second-to-last (not-a-knot)."""
    x = np.asarray(src, dtype=np.float64)
    knots = np.concatenate([[x[0]] * 4, x[2:-2], [x[-1]] * 4])
    collocation = _bspline_basis(knots, x)
    at = _bspline_basis(knots, np.clip(dst, x[0], x[-1]))
    return at @ np.linalg.inv(collocation)


def resize_rel_bias(
    table: torch.Tensor,
    *,
    old_window: Size,
    new_window: Size,
    extra_rows: int = 0,
    layout: str = "LH",
    cubic: bool = False,
) -> torch.Tensor:
    """Resample a relative position bias table from one window (or grid) to another.

    Args:
        table: ``[(2h-1)(2w-1) + extra_rows, heads]`` (``layout="LH"``) or ``[heads, 2h-1, 2w-1]`` (``"HLL"``).
        old_window: the window ``(h, w)`` the table spans.
        new_window: the window to span.
        extra_rows: rows after the positions (BEiT's class rows), kept bit for bit.
        layout: ``"LH"`` or ``"HLL"``.
        cubic: sample the geometric grid with a cubic spline in float64, as the original BEiT fine-tuning code
            did with SciPy's ``interp2d(kind="cubic")`` (removed in SciPy 1.14), instead of timm's linear
            interpolation. The source needs 4 offsets (a window of 3) per side.

    Returns:
        The table for ``new_window``, in the input dtype (the input itself when the window is the same).
    """
    check_dtype(table, "the relative position table")
    if tuple(old_window) == tuple(new_window):
        return table
    src = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    dst = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    flat = layout == "LH"
    extra = table[table.shape[0] - extra_rows :, :] if flat and extra_rows else None
    body = table[: table.shape[0] - extra_rows, :] if flat and extra_rows else table
    heads = body.shape[1] if flat else body.shape[0]
    device, orig_dtype = table.device, table.dtype
    with memory_guard(f"a {list(table.shape)} relative position table"):
        ys, xs = _offsets(src[0], dst[0]), _offsets(src[1], dst[1])
        y, x = torch.tensor(ys), torch.tensor(xs)  # float32, as timm; the spline takes them in float64
        ty, tx = dst[0] // 2.0, dst[1] // 2.0
        dy = torch.arange(-ty, ty + 0.1, 1.0)
        dx = torch.arange(-tx, tx + 0.1, 1.0)
        at = [t.reshape(-1) for t in torch.meshgrid(dy, dx, indexing="ij")]
        out = []
        if cubic:
            my = torch.from_numpy(_spline_matrix(ys, dy.double().numpy()))
            mx = torch.from_numpy(_spline_matrix(xs, dx.double().numpy()))
        for i in range(heads):
            z = (body[:, i].view(src[0], src[1]) if flat else body[i]).float().cpu()
            if cubic:  # float32 values, float64 spline, float32 result: as torch.Tensor(interp2d(...)(dx, dy))
                r = (my @ z.double() @ mx.T).float().reshape(-1).to(device)
            else:
                r = _interp_linear((y, x), z, at).contiguous().to(device)
            out.append(r.view(-1, 1) if flat else r.view(dst[0], dst[1]))
        new = torch.cat(out, dim=-1) if flat else torch.stack(out, dim=0)
        if extra is not None:
            new = torch.cat((new, extra), dim=0)  # promoted as timm's: extra rows round-trip exactly
        return new.to(orig_dtype)


def resize_rel_pos_1d(table: torch.Tensor, length: int) -> torch.Tensor:
    """Resample a 1-D relative table ``[2n-1, dim]`` to ``length`` rows, linearly, as SAM's ``get_rel_pos`` (and
    timm's MViTv2 filter): in the table's own dtype, as they compute it."""
    check_dtype(table, "the relative position table")
    if table.shape[0] == length:
        return table
    with memory_guard(f"a {list(table.shape)} relative position table"):
        work = table.reshape(1, table.shape[0], -1).permute(0, 2, 1)
        new = F.interpolate(work, size=length, mode="linear")
        return new.reshape(-1, length).permute(1, 0)


def relative_position_index(window: Size, *, class_token: bool, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The index a relative bias table is read with, as timm's ``gen_relative_position_index`` builds it:
    ``[h*w, h*w]``, or ``[h*w + 1, h*w + 1]`` with a class token (BEiT), whose rows point at the extra rows."""
    h, w = window
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    if not class_token:
        return rel.sum(-1).to(dtype)
    num = (2 * h - 1) * (2 * w - 1) + 3
    index = torch.zeros((h * w + 1,) * 2, dtype=rel.dtype)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num - 3
    index[0:, 0] = num - 2
    index[0, 0] = num - 1
    return index.to(dtype)
