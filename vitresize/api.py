"""The Python API: :func:`plan`, :func:`convert`, :func:`inspect`. Never prints, never exits.

Heavy imports (torch) happen only where tensors are touched, so importing vitresize stays cheap.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path

from .errors import DeviceError, GeometryError, NoViTFoundError, UsageError
from .formats import Checkpoint, open_checkpoint
from .keymaps import KEYMAPS, Found, TensorInfo, find_vits
from .keymaps.base import kernel_shape, kernel_size, pos_rows, pos_shape, token_rows
from .plan import Embedding, Inspection, ModelPlan, Plan, Report, StateDictSummary, TensorChange
from .resample.conventions import PATCH_METHODS, resolve_conventions
from .resample.geometry import Geometry, Size, format_size, infer_source_grid, parse_size, resolve_target

__all__ = ["convert", "inspect", "plan"]

SizeArg = str | int | tuple[int, int] | None


def _opt_size(value: SizeArg, option: str) -> Size | None:
    return None if value is None else parse_size(value, option=option)


_CLS = ("cls_token", "class_token", "class_embedding", "cls")
_DIST = ("dist_token", "distillation_token")
_OUTSIDE = ("register_tokens", "embeddings.register_tokens")


def _variant(found: Found, tensors: dict[str, TensorInfo], prefix_rows: int) -> str:
    names = []
    for key in found.token_keys:
        short = key[len(found.prefix) :].rsplit(found.keymap.sep, 1)[-1]
        rows = token_rows(tensors[key])
        if short in _CLS:
            names.append("cls")
        elif short in _DIST:
            names.append("dist")
        else:
            names.append(f"{rows} reg")
    text = "+".join(names) if names else "no class token"
    if "dist" in names:
        text = "DeiT distilled: " + text
    if found.token_rows and prefix_rows == 0:
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
    ckpt: Checkpoint, family: str, *, from_grid: Size | None, from_img_size: Size | None, strict: bool
) -> list[Embedding]:
    """Every ViT in every state dict, with its source geometry (``strict``: raise when it cannot be inferred)."""
    meta_hint = _metadata_grid(ckpt.metadata)
    out: list[Embedding] = []
    misses: list[str] = []
    for sd_name, tensors in ckpt.state_dicts.items():
        found, miss = find_vits(tensors, family)
        misses += miss
        for f in found:
            pos, patch = tensors[f.pos_key], tensors[f.patch_key]
            km = f.keymap
            kernel = kernel_size(patch.shape, km.patch_layout)
            num_rows = pos_rows(pos.shape, km.pos_layout)
            assert num_rows is not None  # find_vits checked the layout
            source: Geometry | None = None
            note = None
            rows = f.prefix_candidates()[0]
            how = ""
            try:
                hint, hint_from = _sidecar_grid(ckpt, kernel), "config.json"
                if hint is None:
                    hint, hint_from = meta_hint, "metadata"
                grid, rows, how = infer_source_grid(
                    num_rows=num_rows,
                    prefix_candidates=f.prefix_candidates(),
                    patch=kernel,
                    pos_key=f.pos_key,
                    from_grid=from_grid,
                    from_img_size=from_img_size,
                    hint=hint,
                    hint_from=hint_from,
                )
                source = Geometry(grid=grid, patch=kernel)
                if rows == 0 and f.token_rows and how == "tokens":
                    tokens = ", ".join(k[len(f.prefix) :] for k in f.token_keys)
                    note = (
                        f"{f.pos_key} has no rows for {tokens} (timm no_embed_class): its {num_rows} rows were "
                        f"read as a {format_size(grid)} grid; if it is a non-square grid with prefix rows, "
                        f"pass --from-img-size HxW"
                    )
            except GeometryError as e:
                if strict:
                    raise GeometryError(f"{ckpt.path}: {e}") from None
                note = str(e)
            out.append(
                Embedding(
                    state_dict=sd_name,
                    family=f.keymap.family,
                    key_prefix=f.prefix,
                    variant=_variant(f, tensors, rows),
                    pos_key=f.pos_key,
                    pos_shape=pos.shape,
                    patch_key=f.patch_key,
                    patch_shape=patch.shape,
                    dtype=pos.dtype,
                    prefix_keys=f.token_keys,
                    prefix_rows=rows,
                    source=source,
                    geometry_from=how,
                    note=note,
                    native_method=f.native_method(tensors),
                    position_ids_key=_position_ids(f, tensors),
                )
            )
    if not out and strict:
        looked = "; ".join(f"{km.pos_embed} + {km.patch_embed} ({name})" for name, km in KEYMAPS.items())
        detail = f" ({misses[0]})" if misses else ""
        fam = "" if family == "auto" else f" of family {family!r} (try --family auto)"
        raise NoViTFoundError(
            f"no ViT position embedding{fam} found in {ckpt.path}{detail}; looked for {looked}. "
            f"Is this a ViT checkpoint of a supported family?"
        )
    return out


def _sidecar_grid(ckpt: Checkpoint, kernel: Size) -> Size | None:
    """The grid a sidecar config states for a kernel of this patch size (its image size / the patch)."""
    sc = ckpt.sidecar
    if sc is None or sc.img_size is None or (sc.patch is not None and sc.patch != kernel):
        return None
    img = sc.img_size
    if img[0] % kernel[0] or img[1] % kernel[1]:
        return None
    return (img[0] // kernel[0], img[1] // kernel[1])


def _check_config_can_say(ckpt: Checkpoint, models: tuple[ModelPlan, ...], *, folder: bool) -> None:
    """A folder's config.json must be able to state the target: HF CLIP and SigLIP take one square size."""
    if not folder or ckpt.sidecar is None or ckpt.sidecar.kind != "hf":
        return
    for m in models:
        img = m.target.img_size
        if m.embedding.family == "hf-clip" and (img[0] != img[1] or m.target.patch[0] != m.target.patch[1]):
            raise UsageError(
                f"Hugging Face CLIP/SigLIP models take one square image_size and patch_size, so {ckpt.sidecar.path} "
                f"cannot say {format_size(img)}; choose a square --img-size (or convert the weights file alone "
                f"and resample at run time with interpolate_pos_encoding=True)"
            )


def _list(size: Size | None) -> list[int] | None:
    return None if size is None else [size[0], size[1]]


def _size_of(path: Path) -> int:
    """Bytes of a file, or of the files of a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _position_ids(f: Found, tensors: dict[str, TensorInfo]) -> str | None:
    """The key of a ``[1, rows]`` integer buffer counting the table's rows (older HF CLIP files), if any."""
    if f.keymap.position_ids is None:
        return None
    key = f.prefix + f.keymap.position_ids
    info = tensors.get(key)
    if info is None or len(info.shape) != 2 or info.dtype not in ("int64", "int32"):
        return None
    return key


def _check_device(device: str) -> None:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device {device!r} is not cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device} was requested but CUDA is not available to torch {torch.__version__}; "
                "use --device cpu"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")


def _changes(m: ModelPlan, tensors: dict[str, TensorInfo], patch_method: str) -> list[TensorChange]:
    e, src, dst = m.embedding, m.source, m.target
    out = []
    if src.grid != dst.grid:
        new_rows = e.prefix_rows + dst.num_patches
        dim = e.pos_shape[-1]
        out.append(
            TensorChange(
                state_dict=e.state_dict,
                key=e.pos_key,
                old_shape=e.pos_shape,
                new_shape=pos_shape(new_rows, dim, e.pos_layout),
                dtype=e.dtype,
                op="pos_embed",
                detail=f"grid {format_size(src.grid)} -> {format_size(dst.grid)}",
            )
        )
        if e.position_ids_key is not None:
            info = tensors[e.position_ids_key]
            out.append(
                TensorChange(
                    state_dict=e.state_dict,
                    key=e.position_ids_key,
                    old_shape=info.shape,
                    new_shape=(1, new_rows),
                    dtype=info.dtype,
                    op="position_ids",
                    detail=f"0..{new_rows - 1}, one per row of {e.pos_key}",
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


def plan(
    src: str | os.PathLike[str],
    *,
    img_size: SizeArg = None,
    patch: SizeArg = None,
    grid: SizeArg = None,
    from_img_size: SizeArg = None,
    from_grid: SizeArg = None,
    family: str = "auto",
    method: str = "native",
    interpolation: str | None = None,
    antialias: bool | None = None,
    patch_method: str = "pi",
    device: str = "cpu",
) -> Plan:
    """Work out a conversion from the file's shapes alone (no tensor data is read).

    Args:
        src: the checkpoint (.pth/.pt/.bin or .safetensors; the format is read from the content).
        img_size: target image size, ``384`` or ``"384x512"`` (height x width).
        patch: target patch size; alone, it keeps the source image size.
        grid: target patch grid, instead of ``img_size``.
        from_img_size: the source image size, for sources whose grid is not square.
        from_grid: the source grid, instead of ``from_img_size``.
        family: ``"auto"`` or a key-map family (``"timm"``, ``"torchvision"``).
        method: ``"native"`` (the family's own library), ``"timm"``, ``"torchvision"`` or ``"deit"``.
        interpolation: override the interpolation mode (position table and patch-resize basis).
        antialias: override antialiasing (position table and patch-resize basis).
        patch_method: ``"pi"`` (FlexiViT pseudo-inverse) or ``"interp"`` (plain kernel interpolation).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, where the resampling runs.

    Returns:
        A :class:`Plan` holding the opened source; close it (or use ``with``) when done.

    Raises:
        UsageError: contradictory or invalid options (exit code 2 in the CLI).
        VitresizeError: unreadable input, no ViT found, source geometry not inferable, device missing.

    Example:
        >>> with vitresize.plan("vit.pth", img_size=384) as p:  # doctest: +SKIP
        ...     print([(c.key, c.new_shape) for c in p.changes])
        ...     p.execute("vit_384.safetensors")
    """
    target_img, target_patch, target_grid = (
        _opt_size(img_size, "--img-size"),
        _opt_size(patch, "--patch"),
        _opt_size(grid, "--grid"),
    )
    src_img, src_grid = _opt_size(from_img_size, "--from-img-size"), _opt_size(from_grid, "--from-grid")
    if target_grid is not None and target_img is not None:
        raise UsageError("give either --grid or --img-size, not both (the grid is img-size / patch)")
    if target_img is None and target_patch is None and target_grid is None:
        raise UsageError("no target given; pass --img-size, --patch or --grid")
    if src_img is not None and src_grid is not None:
        raise UsageError("give either --from-grid or --from-img-size, not both")
    if patch_method not in PATCH_METHODS:
        raise UsageError(f"--patch-method {patch_method!r} is not one of {', '.join(PATCH_METHODS)}")
    if family != "auto" and family not in KEYMAPS:
        raise UsageError(f"--family {family!r} is not one of auto, {', '.join(KEYMAPS)}")
    native = KEYMAPS[family].native_method if family in KEYMAPS else "timm"
    resolve_conventions(method, native=native, interpolation=interpolation, antialias=antialias)
    _check_device(device)

    ckpt = open_checkpoint(src)
    try:
        embeddings = _embeddings(ckpt, family, from_grid=src_grid, from_img_size=src_img, strict=True)
        name, pos_conv, basis = resolve_conventions(
            method, native=embeddings[0].native_method, interpolation=interpolation, antialias=antialias
        )
        models = tuple(
            ModelPlan(e, resolve_target(e.source, img_size=target_img, patch=target_patch, grid=target_grid))
            for e in embeddings
            if e.source is not None
        )
        changes = tuple(c for m in models for c in _changes(m, ckpt.state_dicts[m.embedding.state_dict], patch_method))
        _check_config_can_say(ckpt, models, folder=Path(src).is_dir())
        warnings = list(dict.fromkeys(e.note for e in embeddings if e.note))
        sc = ckpt.sidecar
        if sc is not None and changes and not Path(src).is_dir():
            t = models[0].target
            warnings.append(
                f"{sc.path} is left as it is and still describes the old geometry; convert the folder "
                f"(vitresize convert {sc.path.parent} OUT_DIR ...) to get one that says image "
                f"{format_size(t.img_size)}, patch {format_size(t.patch)}"
            )
        if not changes:
            warnings.append(
                "nothing to resample: the target geometry equals the source; tensors are copied as they are"
            )
        return Plan(
            src=Path(src),
            src_format=ckpt.format,
            method=name,
            pos_convention=pos_conv,
            patch_convention=basis,
            patch_method=patch_method,
            device=device,
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
    *,
    force: bool = False,
    dry_run: bool = False,
    select: str | None = None,
    verify: bool = False,
    fsync: bool = False,
    progress: Callable[[int, int], None] | None = None,
    img_size: SizeArg = None,
    patch: SizeArg = None,
    grid: SizeArg = None,
    from_img_size: SizeArg = None,
    from_grid: SizeArg = None,
    family: str = "auto",
    method: str = "native",
    interpolation: str | None = None,
    antialias: bool | None = None,
    patch_method: str = "pi",
    device: str = "cpu",
) -> Report:
    """Move a ViT checkpoint to a new image size and/or patch size, writing ``dst`` atomically.

    Only the position tables and patch kernels change; every other tensor is written byte for byte.
    The output format follows ``dst``'s extension: a ``.pth`` keeps the whole container (every state dict
    converted), a ``.safetensors`` holds one state dict (``select`` names it; the default is the non-EMA
    model) and the report lists what was left out. See :func:`plan` for the geometry options.

    Args:
        src: the checkpoint to read; it is never modified.
        dst: the file to write (``.safetensors`` or ``.pth/.pt/.bin``).
        force: overwrite ``dst`` if it exists (``dst`` may be ``src``).
        dry_run: plan and validate only; nothing is read beyond headers, nothing is written.
        select: which state dict of a container goes into a ``.safetensors`` output (e.g. ``"model_ema"``).
        verify: before the output is put in place, re-read every pass-through tensor from it and compare its
            bytes (SHA-256) with the input; ``Report.verified`` says what was compared.
        fsync: flush the output to disk before returning (survives a power loss; costs about a copy's time).
        progress: called as ``progress(bytes_done, bytes_total)`` while writing (from the writer's threads;
            the total is an estimate, the input's size, until the end).

    Returns:
        A :class:`Report`.

    Example:
        >>> report = vitresize.convert("vit.pth", "vit_384.safetensors", img_size=384)  # doctest: +SKIP
        >>> [c.key for c in report.plan.changes]  # doctest: +SKIP
        ['pos_embed']
    """
    with plan(
        src,
        img_size=img_size,
        patch=patch,
        grid=grid,
        from_img_size=from_img_size,
        from_grid=from_grid,
        family=family,
        method=method,
        interpolation=interpolation,
        antialias=antialias,
        patch_method=patch_method,
        device=device,
    ) as p:
        if dry_run:
            from ._execute import dry_run_report

            return dry_run_report(p, Path(dst), force=force, select=select)
        return p.execute(dst, force=force, select=select, verify=verify, fsync=fsync, progress=progress)


def inspect(
    src: str | os.PathLike[str],
    *,
    family: str = "auto",
    from_img_size: SizeArg = None,
    from_grid: SizeArg = None,
) -> Inspection:
    """Describe a checkpoint: format, nesting, tensor counts, and every ViT's embeddings and geometry.

    A grid that cannot be inferred is reported (``Embedding.note``), not raised.

    Example:
        >>> info = vitresize.inspect("vit.pth")  # doctest: +SKIP
        >>> info.embeddings[0].source.img_size  # doctest: +SKIP
        (224, 224)
    """
    if family != "auto" and family not in KEYMAPS:
        raise UsageError(f"--family {family!r} is not one of auto, {', '.join(KEYMAPS)}")
    src_img, src_grid = _opt_size(from_img_size, "--from-img-size"), _opt_size(from_grid, "--from-grid")
    if src_img is not None and src_grid is not None:
        raise UsageError("give either --from-grid or --from-img-size, not both")
    with open_checkpoint(src) as ckpt:
        embeddings = _embeddings(ckpt, family, from_grid=src_grid, from_img_size=src_img, strict=False)
        warnings = [] if embeddings else [f"no ViT position embedding of a supported family found in {src}"]
        checked = []
        for e in embeddings:
            counts = {k: ckpt.count_nonfinite(e.state_dict, k) for k in (e.pos_key, e.patch_key)}
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
            size_bytes=_size_of(Path(src)),
            config=config,
            metadata=dict(ckpt.metadata),
            state_dicts=tuple(summaries),
            extras=tuple(ckpt.extras),
            embeddings=tuple(embeddings),
            warnings=tuple(warnings),
        )
