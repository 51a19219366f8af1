"""The Python API: :func:`plan`, :func:`convert`, :func:`inspect`. Never prints, never exits.

Heavy imports (torch) happen only where tensors are touched, so importing vitresize stays cheap.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .budgets import check_plan
from .errors import CheckpointFormatError, DeviceError, GeometryError, Message, NoViTFoundError, UsageError, param
from .formats import Checkpoint, open_checkpoint
from .keymaps import KEYMAPS, Found, TensorInfo, find_vits
from .keymaps.base import (
    BIAS_TABLE_OPS,
    RELATIVE_OPS,
    Rule,
    kernel_shape,
    kernel_size,
    pos_grid,
    pos_rows,
    pos_shape,
    token_rows,
)
from .options import EXECUTE_FIELDS, GENERATED_OPS, Family, Options, Target, resolve
from .plans import Embedding, ModelPlan, Plan, TensorChange
from .report import Inspection, Report, StateDictSummary
from .resample.conventions import RESAMPLED_DTYPES, resolve_conventions
from .resample.geometry import Geometry, Size, format_size, given_grid, infer_source_grid, resolve_target

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .options import ConvertFields, OptionsFields, SizeLike

__all__ = ["convert", "inspect", "plan"]


_CLS = ("cls_token", "class_token", "class_embedding", "cls")
_DIST = ("dist_token", "distillation_token")
_OUTSIDE = ("register_tokens", "embeddings.register_tokens")


def _variant(found: Found, tensors: dict[str, TensorInfo], prefix_rows: int) -> str:
    names = []
    for key in found.token_keys:
        short = key[len(found.prefix) :].rsplit(found.keymap.sep, 1)[-1]
        rows = token_rows(tensors[key])
        if short in _CLS or short.rstrip("_0123456789") in _CLS:  # CrossViT's cls_token_0, cls_token_1
            names.append("cls")
        elif short in _DIST:
            names.append("dist")
        else:
            names.append(f"{rows} reg")
    text = "+".join(names) if names else "no class token"
    if "dist" in names:
        text = "DeiT distilled: " + text
    if found.token_rows and prefix_rows == 0 and found.pos_key is not None:
        text += ", no_embed_class"
    for key in _OUTSIDE:
        info = tensors.get(found.prefix + key)
        if info is not None:
            text += f", {token_rows(info)} registers outside the table"
    return text


def _metadata_grid(meta: dict[str, str]) -> Size | None:
    m = re.fullmatch(r"(\d+)x(\d+)", meta.get("vitresize.new_grid", ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _embeddings(
    ckpt: Checkpoint,
    family: str,
    *,
    from_grid: Size | None,
    from_img_size: Size | None,
    strict: bool,
) -> list[Embedding]:
    """Every model in every state dict, with its source geometry (``strict``: raise when it cannot be inferred)."""
    meta_hint = _metadata_grid(ckpt.metadata)
    out: list[Embedding] = []
    misses: list[str] = []
    for sd_name, tensors in ckpt.state_dicts.items():
        found, miss = find_vits(tensors, family)
        misses += miss
        for f in found:
            patch = tensors[f.patch_key]
            km = f.keymap
            kernel = kernel_size(patch.shape, km.patch_layout)
            stride_error: str | None = None
            try:  # a stride that cannot be read is refused (convert) or noted (inspect), like any geometry
                fixed = km.stride(tensors, f.prefix) if km.stride is not None else None
            except GeometryError as e:
                if strict:
                    raise GeometryError(f"{ckpt.path}: {e.message.raw}") from None
                fixed, stride_error = None, e.message.raw
            kernel = (fixed, fixed) if fixed else kernel
            pos = tensors[f.pos_key] if f.pos_key is not None else None
            source: Geometry | None = None
            notes: list[str] = []
            rows = f.prefix_candidates()[0] if pos is not None else 0
            how = ""
            stride_known = grid_known = True
            window: Size | None = None
            try:
                if f.unsupported is not None:
                    raise GeometryError(f"{f.anchor_key} is left alone: {f.unsupported}")
                if stride_error is not None:
                    raise GeometryError(stride_error)
                if f.stem is None or fixed:
                    hint, hint_from = _sidecar_grid(ckpt, kernel), "config.json"
                    if hint is None:
                        hint, hint_from = meta_hint, "metadata"
                    if pos is not None:
                        grid, rows, how = _table_grid(
                            f,
                            pos,
                            kernel,
                            from_grid=from_grid,
                            from_img_size=from_img_size,
                            hint=hint,
                            hint_from=hint_from,
                        )
                    else:
                        maybe, how = _tableless_grid(
                            f,
                            tensors,
                            kernel,
                            from_grid=from_grid,
                            from_img_size=from_img_size,
                            hint=hint,
                            hint_from=hint_from,
                        )
                        grid_known = maybe is not None
                        grid = maybe or (0, 0)
                    source = Geometry(grid=grid, patch=kernel)
                else:
                    assert pos is not None  # a stem marks a table's model
                    num_rows = pos_rows(pos.shape, km.pos_layout)
                    assert num_rows is not None  # find_vits checked the layout
                    sidecar_img = ckpt.sidecar.img_size if ckpt.sidecar is not None else None
                    shape_grid = pos_grid(pos.shape, km.pos_layout)
                    grid, rows, how, stride = _stem_geometry(
                        f,
                        num_rows,
                        kernel,
                        from_grid,
                        from_img_size or sidecar_img,
                        shape_grid or meta_hint,
                        from_img_size is None,
                    )
                    if shape_grid is not None and grid != shape_grid:
                        raise GeometryError(
                            f"{f.pos_key} holds a {format_size(shape_grid)} grid ({list(pos.shape)}), not the "
                            f"{format_size(grid)} grid that {how} gives; check {how}"
                        )
                    stride_known = stride is not None
                    source = Geometry(grid=grid, patch=stride or kernel)
                    if stride is None:
                        notes.append(
                            f"{_stem_text(f, kernel)}, which the weights do not state (image sizes shown are the "
                            f"grid times the kernel); pass {param('from_img_size')} (the image size the checkpoint "
                            f"was trained at) to convert with {param('img_size')}, or give the target as "
                            f"{param('grid')} HxW"
                        )
                window = _source_window(f, tensors, source.grid if grid_known else None)
                if pos is not None and rows == 0 and f.token_rows and how == "tokens":
                    tokens = ", ".join(k[len(f.prefix) :] for k in f.token_keys)
                    notes.append(
                        f"{f.pos_key} has no rows for {tokens} (timm no_embed_class): its "
                        f"{pos_rows(pos.shape, km.pos_layout)} rows were read as a {format_size(source.grid)} grid; "
                        f"if it is a non-square grid with prefix rows, pass {param('from_img_size')} HxW"
                    )
            except GeometryError as e:
                if strict:
                    raise GeometryError(f"{ckpt.path}: {e.message.raw}") from None
                source = None
                notes.append(e.message.raw)
            out.append(
                Embedding(
                    state_dict=sd_name,
                    family=f.keymap.family,
                    key_prefix=f.prefix,
                    variant=_variant(f, tensors, rows),
                    pos_key=f.pos_key,
                    pos_shape=pos.shape if pos is not None else None,
                    patch_key=f.patch_key,
                    patch_shape=patch.shape,
                    dtype=pos.dtype if pos is not None else patch.dtype,
                    prefix_keys=f.token_keys,
                    prefix_rows=rows,
                    source=source,
                    geometry_from=Message(how),
                    note=Message("; ".join(notes)) if notes else None,
                    native_method=f.native_method(tensors),
                    stem=f.stem,
                    stride_known=stride_known,
                    grid_known=grid_known,
                    tied=tuple((k, r, tensors[k].shape, tensors[k].dtype) for k, r in f.tied),
                    window=window,
                )
            )
    if not out and strict:
        detail = f" ({misses[0]})" if misses else ""
        fam = "" if family == "auto" else f" of family {family!r} (try {param('family')} auto)"
        raise NoViTFoundError(
            f"no ViT{fam} of a layout vitresize knows was found in {ckpt.path}{detail}; the README's architecture "
            f"table lists the families it converts (is this a vision transformer checkpoint?)"
        )
    return out


def _table_grid(f: Found, pos: TensorInfo, kernel: Size, **given: Any) -> tuple[Size, int, str]:
    """``(grid, prefix rows, where the grid came from)`` of an absolute table: read from a grid layout's shape
    (checked against what the user gave), else inferred from its rows."""
    layout = f.keymap.pos_layout
    shape_grid = pos_grid(pos.shape, layout)
    num_rows = pos_rows(pos.shape, layout)
    assert num_rows is not None  # find_vits checked the layout
    if shape_grid is None:
        return _infer_grid(f, num_rows, kernel, **given)
    grid, _, how = _infer_grid(f, num_rows, kernel, **{**given, "hint": shape_grid, "hint_from": "table shape"})
    if grid != shape_grid:
        raise GeometryError(
            f"{f.pos_key} holds a {format_size(shape_grid)} grid ({list(pos.shape)}), not the "
            f"{format_size(grid)} grid that {how} gives; check {how}"
        )
    return grid, 0, "table shape" if how == "tokens" else how


def _tableless_grid(
    f: Found,
    tensors: dict[str, TensorInfo],
    kernel: Size,
    *,
    from_grid: Size | None,
    from_img_size: Size | None,
    hint: Size | None,
    hint_from: str,
) -> tuple[Size | None, str]:
    """The grid of a model without an absolute table: read from a table that spans the grid (BEiT's relative
    tables), else given (``from_grid``, ``from_img_size``, a config.json); ``None`` when nothing tells it and
    nothing depends on it."""
    given, how = given_grid(from_grid, from_img_size, kernel)
    spans = [(k, r, tensors[k]) for k, r in f.tied if r.span == "grid" and r.op in RELATIVE_OPS]
    if not spans or f.keymap.grid is not None:  # the family's own reading of its grid, where it has one
        read = f.keymap.grid(tensors, f.prefix) if f.keymap.grid is not None else None
        if read is not None:
            if given is not None and given != read:
                raise GeometryError(
                    f"{f.anchor_key}'s model has a {format_size(read)} grid (its tables' shapes), not the "
                    f"{format_size(given)} grid {how} gives; check {how}"
                )
            return read, "table shape"
        if given is None and hint is not None:
            return hint, hint_from
        return given, how

    def spanned(key: str, rule: Rule, grid: Size) -> Size:
        """What ``key``'s table spans for a model ``grid`` (its stage's grid, where the rule derives one)."""
        return rule.size(key[len(f.prefix) :], grid, kernel) if rule.size is not None else grid

    key, rule, info = spans[0]
    for g, src in ((given, how), (hint, hint_from)):
        if g is not None and rule.spans(info.shape, spanned(key, rule, g)):
            return g, src
        if g is not None and src == how:
            raise GeometryError(
                f"{key} has shape {list(info.shape)}, which does not span a {format_size(g)} grid ({how}); check {how}"
            )
    for k, r, i in spans:  # a table over the model's own grid: one whose rule maps that grid to itself
        g = r.square_span(i.shape)
        if g is not None and spanned(k, r, g) == g:
            return g, "table shape"
    raise GeometryError(
        f"cannot infer the source grid from {key} {list(info.shape)}: it is not a square grid's table; pass "
        f"{param('from_grid')} HxW (or {param('from_img_size')} HxW)"
    )


def _infer_grid(f: Found, num_rows: int, kernel: Size, **given: Any) -> tuple[Size, int, str]:
    """:func:`~vitresize.resample.geometry.infer_source_grid` for a found table of ``num_rows`` rows."""
    return infer_source_grid(
        num_rows=num_rows, prefix_candidates=f.prefix_candidates(), patch=kernel, pos_key=f.anchor_key, **given
    )


def _stem_text(f: Found, kernel: Size) -> str:
    """Why a stem's kernel is not its patch, for messages."""
    return f"{f.patch_key} ({format_size(kernel)}) is not the patch of a model with {f.stem}: its patch is the stride"


def _stride(img: Size, patches: int) -> int | None:
    """The square stride that cuts ``img`` into ``patches`` patches, if there is one."""
    if patches <= 0 or (img[0] * img[1]) % patches:
        return None
    s = math.isqrt(img[0] * img[1] // patches)
    return s if s * s * patches == img[0] * img[1] and img[0] % s == 0 and img[1] % s == 0 else None


def _stem_geometry(
    f: Found,
    num_rows: int,
    kernel: Size,
    from_grid: Size | None,
    img: Size | None,
    meta_hint: Size | None,
    img_from_config: bool,
) -> tuple[Size, int, str, Size | None]:
    """``(grid, prefix rows, where the grid came from, stride)`` of a table behind a stem (``Found.stem``).

    The grid comes from the table's rows (or ``--from-grid``); the stride, which the weights do not state, from
    the image size (``--from-img-size``, else a config.json) over the grid: ``None`` when neither is known.

    Raises:
        GeometryError: ``--from-img-size`` is given and no stride fits it to the table's rows.
    """
    img_from = "config.json" if img_from_config else param("from_img_size")
    if from_grid is None and img is not None:
        for p in f.prefix_candidates():
            s = _stride(img, num_rows - p)
            if s is not None:
                return (img[0] // s, img[1] // s), p, img_from, (s, s)
        if not img_from_config:
            raise GeometryError(
                f"{f.pos_key} has {num_rows} rows, which no stride makes from a {format_size(img)} image "
                f"({_stem_text(f, kernel)}); check {param('from_img_size')}, or give {param('from_grid')} HxW"
            )
    grid, rows, how = _infer_grid(f, num_rows, kernel, from_grid=from_grid, hint=meta_hint, hint_from="metadata")
    if from_grid is not None and img is not None and img[0] % grid[0] == 0 and img[1] % grid[1] == 0:
        return grid, rows, how, (img[0] // grid[0], img[1] // grid[1])
    return grid, rows, how, None


def _check_stems(embeddings: list[Embedding], img: Size | None, patch: Size | None) -> None:
    """A stem's stride is the patch: ``--patch`` cannot change it, and ``--img-size`` needs it known."""
    for e in embeddings:
        if e.stem is None or e.source is None:
            continue
        text = f"{e.patch_key} ({format_size(e.kernel)}) is not the patch of a model with {e.stem}"
        if patch is not None and (not e.stride_known or patch != e.source.patch):
            raise UsageError(
                f"{param('patch')} cannot change the patch of {e.pos_key}'s model: {text}; its patch is the stem's "
                f"stride, which resizing the kernel does not change; give the target as {param('img_size')} or "
                f"{param('grid')}"
            )
        if img is not None and not e.stride_known:
            raise UsageError(
                f"{param('img_size')} needs the stride of {e.pos_key}'s model: {text}, and its stride is not in the "
                f"weights; pass {param('from_img_size')} (the image size it was trained at, e.g. 224), or give the "
                f"target as {param('grid')} HxW"
            )


def _sidecar_grid(ckpt: Checkpoint, kernel: Size) -> Size | None:
    """The grid a sidecar config states for a kernel of this patch size (its image size / the patch)."""
    sc = ckpt.sidecar
    if sc is None or sc.img_size is None or (sc.patch is not None and sc.patch != kernel):
        return None
    img = sc.img_size
    if img[0] % kernel[0] or img[1] % kernel[1]:
        return None
    return (img[0] // kernel[0], img[1] // kernel[1])


def _check_method(changes: tuple[TensorChange, ...], method: str) -> None:
    """``beit``'s cubic spline needs 4 offsets (a window or grid of 3) per side in the tables it resamples."""
    if method != "beit":
        return
    for c in changes:
        if c.op in BIAS_TABLE_OPS and c.spans is not None and min(c.spans[0]) < 3:
            raise UsageError(
                f"{param('method')} beit fits a cubic spline through the source table, which needs a window (or "
                f"grid) of at least 3x3; {c.key} spans {format_size(c.spans[0])}; use {param('method')} timm"
            )


def _check_window(embeddings: list[Embedding], window: Size | None) -> None:
    """``--window`` needs a model whose tables span a window, and a patch change a model whose patch can change."""
    if window is None:
        return
    for e in embeddings:
        if not KEYMAPS[e.family].window:
            raise UsageError(
                f"{param('window')} applies to models with windowed attention (Swin, SAM, TinyViT); {e.anchor_key}'s "
                f"model ({e.family}) has no window to change; drop {param('window')}"
            )


def _model_plan(e: Embedding, target: Target) -> ModelPlan:
    """The geometry one model moves to."""
    assert e.source is not None
    fixed = KEYMAPS[e.family].fixed_patch
    if target.patch is not None and fixed is not None:
        raise UsageError(
            f"{param('patch')} cannot change the patch of {e.anchor_key}'s model: {fixed}; give the target as "
            f"{param('img_size')} or {param('grid')}"
        )
    fixed_grid = KEYMAPS[e.family].fixed_grid
    if fixed_grid is not None and (target.img_size is not None or target.grid is not None):
        raise UsageError(
            f"{e.anchor_key}'s model ({e.family}) cannot move to another image size: {fixed_grid}; use it at the size "
            f"it was trained at"
        )
    if target.img_size is None and target.patch is None and target.grid is None:
        geometry = e.source  # --window alone
    else:
        geometry = resolve_target(e.source, img_size=target.img_size, patch=target.patch, grid=target.grid)
    window = target.window or e.window
    check = KEYMAPS[e.family].check_target
    why = check(geometry.grid, geometry.patch, window) if check is not None else None
    if why is not None:
        raise UsageError(f"{e.anchor_key}'s model ({e.family}) cannot be built at {target.describe()}: {why}")
    return ModelPlan(e, geometry, window=window)


def _nothing_to_change(models: tuple[ModelPlan, ...]) -> str:
    """Why a target changes no tensor, for users: the geometry is the source's, or the scheme ties none to it."""
    m = models[0]
    e = m.embedding
    if m.target.grid == m.source.grid and m.target.patch == m.source.patch and m.window == e.window:
        return "nothing to resample: the target geometry equals the source; tensors are copied as they are"
    return (
        f"nothing to resample: {e.anchor_key}'s model ({e.family}) encodes positions by {e.scheme_text}, so no "
        f"tensor depends on the new geometry; tensors are copied as they are"
    )


def _check_config_can_say(ckpt: Checkpoint, models: tuple[ModelPlan, ...], *, folder: bool) -> None:
    """A folder's config.json must be able to state the target: HF CLIP and SigLIP take one square size, and
    the config of a model with a stem keeps its own patch entry (the 1x1 kernel of a hybrid), which the
    folder writer would replace with the stride."""
    sc = ckpt.sidecar
    if not folder or sc is None:
        return
    for m in models:
        e = m.embedding
        if e.stem is not None and (not e.stride_known or sc.patch != m.target.patch):
            size = format_size(m.target.img_size) if e.stride_known else f"of a {format_size(m.target.grid)} grid"
            raise UsageError(
                f"{sc.path} cannot be rewritten for this model: {e.patch_key} ({format_size(e.kernel)}) follows "
                f"{e.stem}, so its patch is the stride, which the config must not state as patch_size; convert "
                f"the weights file alone and set the image size {size} in the config by hand"
            )
    if sc.kind != "hf":
        return
    if isinstance(sc.data.get("backbone_config"), dict):
        raise UsageError(
            f"{sc.path} keeps the backbone's geometry in backbone_config (a DPT, UperNet or Mask2Former head on a "
            f"backbone), which vitresize does not rewrite; convert the weights file alone and set the sizes in "
            f"backbone_config by hand"
        )
    for m in models:
        img = m.target.img_size
        if m.embedding.family == "hf-clip" and (img[0] != img[1] or m.target.patch[0] != m.target.patch[1]):
            raise UsageError(
                f"Hugging Face CLIP/SigLIP models take one square image_size and patch_size, so {sc.path} "
                f"cannot say {format_size(img)}; choose a square {param('img_size')} (or convert the weights file "
                f"alone and resample at run time with interpolate_pos_encoding=True)"
            )


def _list(size: Size | None) -> list[int] | None:
    return None if size is None else [size[0], size[1]]


def _check_device(device: str) -> None:
    """Whether the CUDA device asked for is there (:class:`Options` checked the spelling)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DeviceError(
                f"{param('device')} {device} was requested but CUDA is not available to torch {torch.__version__}; "
                f"use {param('device')} cpu"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{param('device')} {device}: only {torch.cuda.device_count()} CUDA device(s) visible")


def _changes(m: ModelPlan, tensors: dict[str, TensorInfo], patch_method: str) -> list[TensorChange]:
    e, src, dst = m.embedding, m.source, m.target
    out = []
    new_rows = e.prefix_rows + dst.num_patches
    grid_changes = src.grid != dst.grid and e.grid_known
    if e.pos_key is not None and e.pos_shape is not None and grid_changes:
        out.append(
            TensorChange(
                state_dict=e.state_dict,
                key=e.pos_key,
                old_shape=e.pos_shape,
                new_shape=pos_shape(new_rows, e.pos_shape[-1 if e.pos_layout != "1DHW" else 1], e.pos_layout, dst.grid),
                dtype=e.dtype,
                op="pos_embed",
                detail=f"grid {format_size(src.grid)} -> {format_size(dst.grid)}",
            )
        )
    for key, rule, shape, dtype in e.tied:
        change = _tied_change(m, key, rule, shape, new_rows if grid_changes else None)
        if change is not None:
            new_shape, detail, spans = change
            out.append(
                TensorChange(
                    e.state_dict, key, shape, new_shape, dtype, rule.op, detail, spans, rule.extra_rows, rule.layout
                )
            )
    if src.patch != dst.patch:
        out.append(
            TensorChange(
                state_dict=e.state_dict,
                key=e.patch_key,
                old_shape=e.patch_shape,
                new_shape=kernel_shape(e.patch_shape, dst.patch, e.patch_layout),
                dtype=tensors[e.patch_key].dtype,
                op="patch_embed",
                detail=f"patch {format_size(src.patch)} -> {format_size(dst.patch)}, "
                f"{'PI-resize' if patch_method == 'pi' else 'interpolated'}",
            )
        )
    return out


def _tied_change(
    m: ModelPlan, key: str, rule: Rule, shape: tuple[int, ...], new_rows: int | None
) -> tuple[tuple[int, ...], str, tuple[Size, Size] | None] | None:
    """``(new shape, detail, (old span, new span))`` of a tensor tied to the geometry by ``rule``, or ``None``.

    A table of a ``"grid"`` rule spans the grid; one that does not (SAM's windowed blocks) spans the window.

    Raises:
        GeometryError: the tensor spans neither, or both while only one of them changes.
    """
    e, src, dst = m.embedding, m.source, m.target
    if rule.op == "position_ids":
        if new_rows is None:
            return None
        new = rule.shape_for(shape, (0, 0), rows=new_rows)
        return (new, f"0..{new_rows - 1}, one per row of {e.pos_key}", None) if new is not None else None
    below = key[len(e.key_prefix) :]
    grid_old, grid_new = src.grid, dst.grid
    if rule.size is not None and e.grid_known:
        grid_old = rule.size(below, src.grid, src.patch)
        try:
            grid_new = rule.size(below, dst.grid, dst.patch) if dst.grid != (0, 0) else grid_old
        except GeometryError as err:  # a target the family cannot be built at: the user's to change (exit 2)
            raise UsageError(err.message.raw) from None
    spans_grid = rule.span == "grid" and e.grid_known and rule.spans(shape, grid_old)
    old_window = e.window if e.window is not None and rule.spans(shape, e.window) else rule.square_span(shape)
    spans_window = rule.span == "window" or (e.grid_known and not spans_grid and KEYMAPS[e.family].window)
    ambiguous = spans_grid and e.window is not None and rule.spans(shape, e.window)
    if ambiguous and rule.shape_for(shape, grid_new) != rule.shape_for(shape, m.window or e.window or grid_new):
        raise GeometryError(
            f"{key} {list(shape)} spans both the {format_size(src.grid)} grid and the {format_size(e.window)} "
            f"window, so vitresize cannot tell whether it follows the grid or the window; change both to the "
            f"same size, or neither"
        )
    if spans_grid:
        old, new_size, what = grid_old, grid_new, "grid"
    elif spans_window and old_window is not None:
        old, new_size, what = old_window, m.window or old_window, "window"
        if rule.scale and e.window is not None and m.window is not None:
            num = (old[0] * m.window[0], old[1] * m.window[1])
            if num[0] % e.window[0] or num[1] % e.window[1]:
                raise UsageError(
                    f"{key} spans a {format_size(old)} window, {old[0]}/{e.window[0]} of the model's "
                    f"{format_size(e.window)}; at {param('window')} {format_size(m.window)} that is not a whole "
                    f"window; choose a multiple of {e.window[0] // math.gcd(*e.window, *old)}"
                )
            new_size = (num[0] // e.window[0], num[1] // e.window[1])
        if rule.stage:
            if dst.grid == (0, 0):
                raise GeometryError(
                    f"{key} belongs to a stage whose window depends on the grid, which is not known; pass "
                    f"{param('from_img_size')} (or {param('img_size')})"
                )
            new_size = rule.stage_window(below, new_size, dst.grid)
    elif not e.grid_known and rule.span == "grid":
        if dst.grid == (0, 0):
            return None
        raise GeometryError(
            f"{key} {list(shape)} spans the source grid, which is not known; pass {param('from_img_size')} or "
            f"{param('from_grid')}"
        )
    elif not e.grid_known:
        raise GeometryError(
            f"{key} has shape {list(shape)}, which spans no window vitresize can read, and the grid is not known; "
            f"pass {param('from_img_size')} or {param('from_grid')}"
        )
    else:
        raise GeometryError(
            f"{key} has shape {list(shape)}, which spans neither the {format_size(src.grid)} grid nor a window "
            f"vitresize can read; it is refused rather than converted wrongly"
        )
    if old == new_size:
        return None
    new = rule.shape_for(shape, new_size)
    assert new is not None  # spans() checked the shape
    if new == tuple(shape):  # a 1-D table along the axis that keeps its size
        return None
    how = {
        "abs_table": "absolute table",
        "nest_table": "block tables",
        "attn_bias": "attention-bias table",
        "hf_rel_bias": "relative bias table (as transformers resamples it)",
        "rel_bias": "relative bias table",
        "rel_pos_1d": "1-D relative table",
        "rel_index": "index regenerated",
    }
    return new, f"{what} {format_size(old)} -> {format_size(new_size)}, {how.get(rule.op, rule.op)}", (old, new_size)


def _source_window(f: Found, tensors: dict[str, TensorInfo], grid: Size | None) -> Size | None:
    """The attention window of a windowed family, read from its first table that spans one (square): a table of a
    ``"window"`` rule, or one of a ``"grid"`` rule that does not span the ``grid`` (SAM's windowed blocks)."""
    if not f.keymap.window:
        return None
    for key, rule in f.tied:
        if rule.op == "rel_index":
            continue
        if rule.span == "window" or (grid is not None and not rule.spans(tensors[key].shape, grid)):
            w = rule.square_span(tensors[key].shape)
            if w is None:
                raise GeometryError(f"{key} has shape {list(tensors[key].shape)}, which is not a square window's table")
            return w
    grid_tables = [(k, r) for k, r in f.tied if r.op != "rel_index" and r.span == "grid" and r.op in RELATIVE_OPS]
    if grid is not None and grid_tables and all(r.spans(tensors[k].shape, grid) for k, r in grid_tables):
        return grid  # every table spans the grid: the windowed ones too (SAM at grid = window)
    return None


def _check_dtypes(changes: tuple[TensorChange, ...]) -> None:
    """Only floating tensors are interpolated: an integer, bool, complex or float8 table is refused."""
    for c in changes:
        if c.op not in GENERATED_OPS and c.dtype not in RESAMPLED_DTYPES:
            name = f"{c.state_dict}/{c.key}" if c.state_dict else c.key
            raise CheckpointFormatError(
                f"{name} is {c.dtype}, and vitresize resamples only {', '.join(RESAMPLED_DTYPES)} tensors; "
                f"convert it to float32 in the checkpoint first (is it the tensor you think it is?)"
            )


def plan(
    src: str | os.PathLike[str],
    target: Target | None = None,
    options: Options | None = None,
    **fields: Unpack[OptionsFields],
) -> Plan:
    """Work out a conversion from the file's shapes alone (no tensor data is read).

    The target and options are given as objects, or as keyword arguments named as their fields:
    ``plan("vit.pth", img_size=384)`` is ``plan("vit.pth", Target(img_size=384))``.

    A model whose patch kernel follows a stem (a hybrid's CNN under ``patch_embed.backbone``, Hiera's strided
    conv) has the stem's stride as its patch, which the weights do not state: ``from_img_size`` (or a
    config.json) gives it, ``img_size`` needs it, ``patch`` is refused, and ``grid`` works without it.

    Budgets, checked before anything is read or allocated (``allow_large=True`` lifts them): the output may be
    at most :data:`~vitresize.budgets.LARGE_RATIO` (10) times the source's size once it is over
    :data:`~vitresize.budgets.LARGE_FLOOR` (16 MiB), and the resampled tensors plus the resampling's working
    memory at most :data:`~vitresize.budgets.MEMORY_CAP` (4 GiB).

    Args:
        src: the checkpoint (.pth/.pt/.bin, .safetensors, .npz, or a model folder; the format is read from the
            content).
        target: the geometry to convert to (:class:`~vitresize.options.Target`: ``img_size``, ``patch``,
            ``grid``, and ``from_img_size`` / ``from_grid`` for the source's).
        options: how to find and resample the ViT (:class:`~vitresize.options.Options`: ``family``, ``method``,
            ``interpolation``, ``antialias``, ``patch_method``, ``device``, ``allow_large``).
        **fields: the fields of ``target`` and ``options`` instead.

    Returns:
        A :class:`Plan` holding the opened source; close it (or use ``with``) when done.

    Raises:
        TypeError: an unknown keyword, or a field given both ways.
        UsageError: contradictory or invalid options, a stem's unknown stride, a target over the budgets
            (exit code 2 in the CLI).
        CheckpointFormatError: a table or kernel to resample is not float16, bfloat16, float32 or float64.
        VitresizeError: unreadable input, no ViT found, source geometry not inferable, device missing.

    Example:
        >>> with vitresize.plan("vit.pth", img_size=384) as p:  # doctest: +SKIP
        ...     print([(c.key, c.new_shape) for c in p.changes])
        ...     p.execute("vit_384.safetensors")
    """
    target, options = resolve(target, options, dict(fields))
    if target.is_empty:
        raise UsageError(f"no target given; pass {param('img_size')}, {param('patch')} or {param('grid')}")
    _check_device(options.device)
    family, method = options.family, options.method
    interpolation, antialias, patch_method = options.interpolation, options.antialias, options.patch_method

    ckpt = open_checkpoint(src)
    try:
        embeddings = _embeddings(
            ckpt, family, from_grid=target.from_grid, from_img_size=target.from_img_size, strict=True
        )
        _check_stems(embeddings, target.img_size, target.patch)
        _check_window(embeddings, target.window)
        name, pos_conv, basis = resolve_conventions(
            method, native=embeddings[0].native_method, interpolation=interpolation, antialias=antialias
        )
        models = tuple(_model_plan(e, target) for e in embeddings if e.source is not None)
        changes = tuple(c for m in models for c in _changes(m, ckpt.state_dicts[m.embedding.state_dict], patch_method))
        _check_dtypes(changes)
        _check_method(changes, name)
        _check_config_can_say(ckpt, models, folder=Path(src).is_dir())
        if not options.allow_large:
            check_plan(models, changes, ckpt.size_bytes, target.describe(), pos_conv, patch_method)
        warnings = list(dict.fromkeys(e.note for e in embeddings if e.note))
        sc = ckpt.sidecar
        moved = any(m.target != m.source or m.window != m.embedding.window for m in models)
        if sc is not None and (changes or moved) and not Path(src).is_dir():
            t = models[0].target
            if models[0].embedding.stem is not None:
                what = f"set the image size {format_size(t.img_size)} in it by hand (keep its patch entry)"
                if not models[0].embedding.stride_known:
                    what = f"set in it the image size of a {format_size(t.grid)} grid by hand"
                warnings.append(f"{sc.path} is left as it is and still describes the old geometry; {what}")
            else:
                warnings.append(
                    f"{sc.path} is left as it is and still describes the old geometry; convert the folder "
                    f"(vitresize convert {sc.path.parent} OUT_DIR ...) to get one that says image "
                    f"{format_size(t.img_size)}, patch {format_size(t.patch)}"
                )
        if not changes:
            warnings.append(_nothing_to_change(models))
        return Plan(
            src=Path(src),
            src_format=ckpt.format,
            target=target,
            options=options,
            method=name,
            pos_convention=pos_conv,
            patch_convention=basis,
            models=models,
            changes=changes,
            num_tensors=sum(len(ckpt.state_dicts[s]) for s in dict.fromkeys(m.embedding.state_dict for m in models)),
            warnings=tuple(warnings),
            checkpoint=ckpt,
        )
    except BaseException:
        ckpt.close()
        raise


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    target: Target | None = None,
    options: Options | None = None,
    **fields: Unpack[ConvertFields],
) -> Report:
    """Move a ViT checkpoint to a new image size and/or patch size, writing ``dst`` atomically.

    Only the position tables and patch kernels change; every other tensor is written byte for byte.
    The output format follows ``dst``'s extension: a ``.pth`` keeps the whole container (every state dict
    converted), a ``.safetensors`` holds one state dict (``select`` names it; the default is the non-EMA
    model) and the report lists what was left out; a model folder is written as a folder. See :func:`plan`
    for ``target``, ``options`` and the keyword arguments that stand for them.

    Args:
        src: the checkpoint to read; it is never modified.
        dst: the file to write (``.safetensors``, ``.pth/.pt/.bin`` or ``.npz``), or the folder.
        target: the geometry to convert to (or its fields as keyword arguments).
        options: how to find and resample the ViT (or its fields as keyword arguments).
        force: overwrite ``dst`` if it exists (``dst`` may be ``src``).
        dry_run: plan and validate only; nothing is read beyond headers, nothing is written.
        select: which state dict of a container goes into a ``.safetensors`` output (e.g. ``"model_ema"``).
        verify: before the output is put in place, re-read every pass-through tensor from it and compare its
            bytes (SHA-256) with the input; ``Report.verified`` says what was compared.
        fsync: flush the output to disk before returning (survives a power loss; costs about a copy's time).
        progress: called as ``progress(bytes_done, bytes_total)`` while writing (from the writer's threads;
            the total is an estimate, the input's size, until the end).
        **fields: the fields of ``target`` and ``options`` (see :func:`plan`); ``allow_large`` also lifts the
            budget on a ``.safetensors`` output, which stores in full a broadcast tensor that a ``.pth`` holds in
            a few bytes.

    Returns:
        A :class:`Report`.

    Example:
        >>> report = vitresize.convert("vit.pth", "vit_384.safetensors", img_size=384)  # doctest: +SKIP
        >>> [c.key for c in report.plan.changes]  # doctest: +SKIP
        ['pos_embed']
    """
    given: dict[str, Any] = dict(fields)
    execute = {k: given.pop(k) for k in EXECUTE_FIELDS if k in given}
    with plan(src, target, options, **given) as p:
        return p.execute(dst, **execute)


def inspect(
    src: str | os.PathLike[str],
    *,
    family: Family = "auto",
    from_img_size: SizeLike | None = None,
    from_grid: SizeLike | None = None,
) -> Inspection:
    """Describe a checkpoint: format, nesting, tensor counts, and every ViT's embeddings and geometry.

    A grid that cannot be inferred is reported (``Embedding.note``), not raised.

    Args:
        src: the checkpoint file or model folder.
        family: ``"auto"`` or the checkpoint family to look for.
        from_img_size: the image size the checkpoint was trained at, where the weights cannot tell.
        from_grid: the source's patch grid, instead of ``from_img_size``.

    Example:
        >>> info = vitresize.inspect("vit.pth")  # doctest: +SKIP
        >>> info.embeddings[0].source.img_size  # doctest: +SKIP
        (224, 224)
    """
    options = Options(family=family)
    target = Target(from_img_size=from_img_size, from_grid=from_grid)
    with open_checkpoint(src) as ckpt:
        embeddings = _embeddings(
            ckpt, options.family, from_grid=target.from_grid, from_img_size=target.from_img_size, strict=False
        )
        warnings = [] if embeddings else [f"no ViT position embedding of a supported family found in {src}"]
        checked = []
        for e in embeddings:
            keys = [k for k in (e.pos_key, e.patch_key) if k is not None]
            keys += [k for k, r, _, _ in e.tied if r.op not in GENERATED_OPS]
            counts = {k: ckpt.count_nonfinite(e.state_dict, k) for k in keys}
            for k, n in counts.items():
                if n:
                    name = f"{e.state_dict}/{k}" if e.state_dict else k
                    warnings.append(f"{name} holds {n} NaN/Inf value(s); resampling would spread them")
            checked.append(dataclasses.replace(e, nonfinite=counts))
        embeddings = checked
        summaries = []
        for name, tensors in ckpt.state_dicts.items():
            dtypes: dict[str, int] = {}
            for info in tensors.values():
                dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
            summaries.append(StateDictSummary(name, len(tensors), sum(t.numel for t in tensors.values()), dtypes))
        sc = ckpt.sidecar
        config = None
        if sc is not None:
            config = {"path": str(sc.path), "kind": sc.kind, "img_size": _list(sc.img_size), "patch": _list(sc.patch)}
        return Inspection(
            path=Path(src),
            format=ckpt.format,
            size_bytes=ckpt.size_bytes,
            config=config,
            metadata=dict(ckpt.metadata),
            state_dicts=tuple(summaries),
            extras=tuple(ckpt.extras),
            embeddings=tuple(embeddings),
            warnings=tuple(warnings),
        )
