"""Write a model folder: only the files holding a changed tensor are rewritten (and ``config.json`` gets the
new geometry); the rest is copied.

What is copied is what :func:`~vitresize.formats.folder.scan_folder` let through: regular files (a link
inside the folder comes out as a copy of its file, a link to a hub cache blob too), in the folder and its
subfolders. Every file and folder of the output keeps its source's permission bits, never wider
(``& ~umask``): a file's as it is written, the folders' last (:func:`~vitresize.formats.atomic.atomic_folder`
applies them after the files are written and flushed, so a read-only folder never stands in the way of
writing or cleaning up).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ._verify import Verification, verify_output
from .formats import ROOT
from .formats.atomic import atomic_folder, permissions
from .formats.folder import copy_regular

if TYPE_CHECKING:
    from ._execute import _Resampled
    from .formats.folder import ShardedCheckpoint
    from .formats.safetensors import Progress
    from .plan import Plan

__all__ = ["write_folder"]


def write_folder(
    plan: Plan,
    ckpt: ShardedCheckpoint,
    resampled: _Resampled,
    dst: Path,
    *,
    force: bool,
    verify: bool,
    fsync: bool,
    progress: Progress | None,
) -> tuple[int, list[str], list[str], Verification | None]:
    """Returns ``(bytes written, rewritten files, copied files, verification)``."""
    from ._execute import _write_safetensors, _write_torch
    from .formats.safetensors import SafetensorsCheckpoint

    changed_shards = {ckpt.shard_of[key] for sd, key in resampled.changes if sd == ROOT}
    sidecar = ckpt.sidecar if plan.changes else None
    rewritten, copied = [], []
    checked = [0, 0]
    total = 0
    mode, folder_modes = ckpt.path.stat().st_mode, ckpt.scan.folders
    with atomic_folder(dst, force=force, fsync=fsync, mode=mode, folder_modes=folder_modes) as tmp:
        for name in ckpt.folders:
            (tmp / name).mkdir()
        for name, source in ckpt.files.items():
            out = tmp / name
            mode = permissions(source.stat().st_mode, 0o666)
            shard = ckpt.shards.get(name)
            if shard is not None and name in changed_shards:
                fmt = "safetensors" if isinstance(shard, SafetensorsCheckpoint) else "torch"
                if fmt == "safetensors":
                    total += _write_safetensors(plan, shard, ROOT, resampled, out, progress)
                else:
                    repl = {k: t for k, t in resampled().items() if ckpt.shard_of.get(k[1]) == name}
                    total += _write_torch(shard, repl, out, progress)
                out.chmod(mode)
                rewritten.append(name)
                if verify:
                    keys = {k for (sd, k) in resampled.changes if ckpt.shard_of.get(k) == name}
                    v = verify_output(shard, out, fmt, (ROOT,), {(ROOT, k) for k in keys})
                    checked[0], checked[1] = checked[0] + v.tensors, checked[1] + v.bytes
            elif (ckpt.index_path is not None and name == ckpt.index_path.name) or name in ckpt.duplicates:
                continue
            elif sidecar is not None and name == sidecar.path.name:
                target = plan.models[0].target
                sidecar.write(out, target.img_size, target.patch)
                out.chmod(mode)
                total += out.stat().st_size
                rewritten.append(name)
            else:
                size = copy_regular(source, out, mode=mode)
                total += size
                top = name.split("/")[0]
                if top == name:
                    copied.append(name)
                elif not copied or copied[-1] != top + "/":
                    copied.append(top + "/")
                if progress:
                    progress(size)
                if verify and isinstance(shard, SafetensorsCheckpoint):
                    v = verify_output(shard, out, "safetensors", (ROOT,), set())
                    checked[0], checked[1] = checked[0] + v.tensors, checked[1] + v.bytes
        if ckpt.index_path is not None:
            index = dict(ckpt.index)
            meta = dict(index.get("metadata") or {})
            if "total_size" in meta or not meta:
                meta["total_size"] = _total_size(plan, ckpt)
            index["metadata"] = meta
            raw = json.dumps(index, indent=2, sort_keys=False) + "\n"
            out = tmp / ckpt.index_path.name
            out.write_text(raw)
            out.chmod(permissions(ckpt.index_path.stat().st_mode, 0o666))
            total += len(raw)
            rewritten.append(ckpt.index_path.name)
        for name in ckpt.folders:  # their modes: atomic_folder, once all is written
            if "/" not in name and f"{name}/" not in copied:  # an empty one
                copied.append(f"{name}/")
    copied.sort(key=lambda n: n.rstrip("/"))
    verification = Verification(tensors=checked[0], bytes=checked[1]) if verify else None
    return total, rewritten, copied, verification


def _total_size(plan: Plan, ckpt: ShardedCheckpoint) -> int:
    """Bytes of tensor data in the output, as transformers counts ``total_size`` in an index."""
    from .formats._dtypes import nbytes

    new = {c.key: c.new_shape for c in plan.changes if c.state_dict == ROOT}
    return sum(nbytes(new.get(k, info.shape), info.dtype) for k, info in ckpt.state_dicts[ROOT].items())
