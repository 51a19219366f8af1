"""Read a checkpoint into a :class:`~.base.Side` (its ViT's whole state dict and geometry), and convert one in
memory (the reference conversions of ``check``)."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from ..api import inspect, plan
from ..errors import GeometryError, NoViTFoundError, param
from ..formats import open_checkpoint
from .base import Side

if TYPE_CHECKING:
    from ..options import Family, Options, SizeLike, Target

__all__ = ["convert_side", "read_side"]


def read_side(
    path: str | os.PathLike[str],
    *,
    family: Family = "auto",
    from_img_size: SizeLike | None = None,
    from_grid: SizeLike | None = None,
    role: str = "ORIGINAL",
) -> Side:
    """The first ViT of ``path`` (as ``inspect`` finds it), its state dict read whole (``weights_only``).

    ``role`` names the checkpoint in messages: ``"CONVERTED"``'s geometry is given with ``img_size`` /
    ``grid`` (``from_img_size`` / ``from_grid`` here), ``"ORIGINAL"``'s with ``from_img_size``.

    Raises:
        NoViTFoundError: no ViT in the file.
        GeometryError: its geometry cannot be told (the message says what to pass).
    """
    ins = inspect(path, family=family, from_img_size=from_img_size, from_grid=from_grid)
    if not ins.embeddings:
        raise NoViTFoundError(f"no ViT of a supported family found in {path}; nothing to check")
    e = ins.embeddings[0]
    g = e.source
    if g is None or not e.stride_known or not e.grid_known:
        if role == "CONVERTED":
            raise GeometryError(
                f"{path} (CONVERTED): its geometry cannot be told from the weights; give its image size with "
                f"{param('img_size')} HxW (or its grid with {param('grid')} HxW)"
            )
        raise GeometryError(f"{path}: {e.note or 'its geometry cannot be told from the weights'}")
    with open_checkpoint(path) as ckpt:
        tensors = {k: ckpt.tensor(e.state_dict, k) for k in ckpt.state_dicts[e.state_dict]}
        sc = ckpt.sidecar
        return Side(
            path=ckpt.path,
            format=ckpt.format,
            embedding=e,
            state_dict=tensors,
            config=sc.data if sc is not None else None,
            config_kind=sc.kind if sc is not None else None,
            config_img_size=sc.img_size if sc is not None else None,
            config_patch=sc.patch if sc is not None else None,
            img_size=g.img_size,
            patch=g.patch,
            grid=g.grid,
            window=e.window,
        )


def convert_side(side: Side, target: Target, options: Options) -> Side:
    """``side`` converted to ``target`` in memory, as ``vitresize convert`` would write it (no file written)."""
    if target.from_grid is None and target.from_img_size is None:
        target = dataclasses.replace(target, from_grid=side.grid)  # the side's geometry, as read (or given) once
    with plan(side.path, target, options) as p:
        new = p.resampled()
        m = next(m for m in p.models if m.embedding.state_dict == side.embedding.state_dict)
        tensors = dict(side.state_dict)
        for (sd, key), t in new.items():
            if sd == side.embedding.state_dict:
                tensors[key] = t
        return dataclasses.replace(
            side,
            state_dict=tensors,
            img_size=m.target.img_size,
            patch=m.target.patch,
            grid=m.target.grid,
            window=m.window if m.window is not None else side.window,
        )
