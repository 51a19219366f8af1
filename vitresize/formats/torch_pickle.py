"""torch pickles (``.pth/.pt/.bin``): loaded with ``weights_only=True`` only, zip files memory-mapped.

The allow-list is ``argparse.Namespace`` (training checkpoints carry ``args``, as timm allows) and NumPy
scalars (``best_acc1 = np.float64(...)``): types whose unpickling builds plain data and runs no code.
Nothing else. A refused global is named in the error, and there is no unsafe fallback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import CheckpointFormatError, UnsafeCheckpointError
from ..keymaps import TensorInfo
from .base import ROOT, Checkpoint

if TYPE_CHECKING:
    import torch

__all__ = ["TorchCheckpoint", "iter_state_dicts", "load_container", "save_container"]

_MAX_DEPTH = 4


def _safe_globals() -> list[Any]:
    """``argparse.Namespace``, and NumPy's scalar constructor and ``dtype`` under both module names."""
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np
        from numpy._core.multiarray import scalar  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # pragma: no cover - NumPy < 2, or no NumPy: nothing of it to allow
        return allowed
    allowed += [np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar")]
    allowed += [type(np.dtype(c)) for c in "?bhilqBHILQefdgFDG"]  # numpy.dtypes.Float64DType, ...
    return allowed


def load_container(path: Path, *, mmap: bool) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with the allow-list and clear errors."""
    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()), _loadable(path, mmap) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about odd pickle protocols; the error says more
            return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap and not hasattr(f, "read"))
    except pickle.UnpicklingError as e:
        what = _blocked(str(e))
        if what is None:
            raise CheckpointFormatError(
                f"cannot read {path} as a torch checkpoint: {_first_line(str(e))} (truncated or corrupt?)"
            ) from None
        raise UnsafeCheckpointError(
            f"refused to load {path}: weights_only=True blocked it ({what}); vitresize never runs code from a "
            f"checkpoint: re-save its state_dict (torch.save or safetensors) where you trust the file"
        ) from None
    except MemoryError:
        raise CheckpointFormatError(
            f"cannot read {path} as a torch checkpoint: it declares more data than fits in memory (corrupt?)"
        ) from None
    except Exception as e:  # any failure inside torch.load on a file is a bad file
        reason = _first_line(str(e)) or type(e).__name__
        raise CheckpointFormatError(
            f"cannot read {path} as a torch checkpoint: {reason} (truncated or corrupt?)"
        ) from None


def _first_line(message: str) -> str:
    """The line of a torch error that says what went wrong, without its advice (at most 200 characters)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            line = line.removeprefix("WeightsUnpickler error:").strip()
            if line:
                return line[:200]
    meaningful = [
        ln for ln in lines if not ln.startswith(("Weights only load failed", "In PyTorch 2.6", "Please file"))
    ]
    line = (meaningful or lines or [""])[0]
    for noise in (". This is an internal miniz error", "  (Could this error message be improved?"):
        line = line.split(noise)[0]
    return line[:200]


@contextlib.contextmanager
def _loadable(path: Path, mmap: bool) -> Iterator[Any]:
    """What to give torch.load: the path, except for names ending ``.safetensors``, which torch.load hands
    to safetensors whatever the content; those go by ``/proc/self/fd`` (keeps mmap) or as a file object."""
    if not path.name.endswith(".safetensors"):
        yield path
    elif mmap and Path("/proc/self/fd").is_dir():
        fd = os.open(path, os.O_RDONLY)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
    else:
        with open(path, "rb") as f:
            yield f


def _blocked(message: str) -> str | None:
    """What weights_only refused to build (a global, a type), or ``None`` when the pickle is just broken."""
    for line in message.splitlines():
        if "can only build" in line.lower() and "but got" in line:
            return "unsupported type " + line.rsplit("but got", 1)[1].strip().rstrip(".")
        if "unsupported global" in line.lower() or "is blocked" in line:
            line = line.strip().removeprefix("WeightsUnpickler error:").strip()
            return re.split(r"\.\s", line, maxsplit=1)[0].rstrip(".")
    return None


def _is_state_dict(node: Mapping[Any, Any]) -> bool:
    import torch

    has_tensor = False
    for k, v in node.items():
        if not isinstance(k, str) or isinstance(v, Mapping):
            return False
        has_tensor = has_tensor or isinstance(v, torch.Tensor)
    return has_tensor


def iter_state_dicts(
    obj: Any, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], MutableMapping[str, Any]]]:
    """Every model-like dict in a container: string keys, tensor values, no nested dicts."""
    if not isinstance(obj, Mapping):
        return
    if _is_state_dict(obj):
        yield path, obj  # type: ignore[misc]
        return
    if len(path) >= _MAX_DEPTH:
        return
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, Mapping):
            yield from iter_state_dicts(v, (*path, k))


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class TorchCheckpoint(Checkpoint):
    """A torch pickle. Zip files are memory-mapped (tensor bytes read on use); legacy pickles load whole."""

    def __init__(self, path: Path, *, zip_format: bool) -> None:
        import torch

        self.path = path
        self.format = "torch-zip" if zip_format else "torch-legacy"
        self.lazy = zip_format
        self.metadata = {}
        self.container = load_container(path, mmap=zip_format)
        self._sds: dict[str, MutableMapping[str, Any]] = {}
        self.state_dicts = {}
        for p, sd in iter_state_dicts(self.container):
            name = "/".join(p) if p else ROOT
            self._sds[name] = sd
            self.state_dicts[name] = {
                k: TensorInfo(tuple(v.shape), _dtype_name(v)) for k, v in sd.items() if isinstance(v, torch.Tensor)
            }
        self.extras = self._extras()

    def _extras(self) -> list[str]:
        if not isinstance(self.container, Mapping) or ROOT in self._sds:
            return []
        tops = {name.split("/")[0] for name in self._sds}
        return [str(k) for k in self.container if str(k) not in tops]

    def raw_state_dict(self, name: str) -> MutableMapping[str, Any]:
        """The loaded dict itself (tensors mmap-backed for zip files); changes to it go into :func:`save_container`."""
        return self._sds[name]

    def tensor(self, state_dict: str, key: str) -> torch.Tensor:
        t: torch.Tensor = self._sds[state_dict][key]
        return t

    def close(self) -> None:
        self._sds = {}
        self.container = None


class _Sink:
    """A file wrapper that remembers the OS error of a failed write: torch.save reports a full disk only as
    ``RuntimeError: unexpected pos``, and the caller needs the real ``ENOSPC``."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_container(obj: Any, dst: Path) -> None:
    """``torch.save`` in the zip format.

    Raises:
        OSError: the write failed (disk full, I/O error), with its errno.
    """
    import torch

    with open(dst, "wb") as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)  # type: ignore[arg-type]
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise
