"""Checkpoint formats: sniff the input from its bytes, open it lazily, pick the output writer by extension.

One module per format: ``safetensors``, ``torch_pickle``. Only this package touches files.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

from ..errors import CheckpointFormatError, UnsafeCheckpointError, UsageError
from .base import ROOT, Checkpoint

__all__ = ["OUTPUT_FORMATS", "ROOT", "Checkpoint", "open_checkpoint", "output_format", "sniff"]

OUTPUT_FORMATS: dict[str, str] = {
    ".safetensors": "safetensors",
    ".pth": "torch",
    ".pt": "torch",
    ".bin": "torch",
    ".ckpt": "torch",
    ".npz": "npz",
}


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except Exception as e:  # zipfile raises many kinds on garbage (BadZipFile, NotImplementedError, ...)
        raise CheckpointFormatError(
            f"{path} looks like a zip archive but cannot be read: {e or type(e).__name__} (truncated or corrupt?)"
        ) from None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise UnsafeCheckpointError(
            f"{path} is a TorchScript archive, which cannot be loaded without running its code; in a trusted "
            f"environment load it and save model.state_dict() with torch.save or safetensors"
        )
    if any(n.endswith("data.pkl") for n in names):
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise CheckpointFormatError(f"{path} is a zip archive but not a torch checkpoint (no data.pkl inside)")


def sniff(path: Path) -> str:
    """The format of ``path`` from its content: ``safetensors``, ``torch-zip``, ``torch-legacy`` or ``npz``.

    Raises:
        CheckpointFormatError: missing, unreadable, empty, a folder, or no known format.
    """
    if not path.exists():
        raise CheckpointFormatError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointFormatError(f"{path} is a folder; pass the checkpoint file inside it")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointFormatError(f"cannot read {path}: {e.strerror}") from None
    size = path.stat().st_size
    if not head:
        raise CheckpointFormatError(f"{path} is empty (0 bytes); re-download or re-save it")
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    # safetensors first: its 8-byte header length may start with 0x80, like a pickle.
    if len(head) == 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n <= size:
            return "safetensors"
        if head[:1] != b"\x80":
            raise CheckpointFormatError(
                f"{path} is a truncated safetensors file: its header needs {8 + n} bytes, it has {size}"
            )
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise CheckpointFormatError(
        f"{path} is not a checkpoint vitresize can read (expected safetensors or a torch .pth/.pt/.bin)"
    )


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint lazily, whatever its extension says (a folder: its weights files, index and config),
    with the sidecar ``config.json`` beside it, if any."""
    from .sidecar import find_sidecar

    p = Path(path)
    ckpt = _open(p)
    try:
        ckpt.sidecar = find_sidecar(p)
    except BaseException:
        ckpt.close()
        raise
    return ckpt


def _open(p: Path) -> Checkpoint:
    if p.is_dir():
        from .folder import ShardedCheckpoint

        return ShardedCheckpoint(p)
    kind = sniff(p)
    if kind == "safetensors":
        from .safetensors import SafetensorsCheckpoint

        return SafetensorsCheckpoint(p)
    if kind == "npz":
        from .npz import NpzCheckpoint

        return NpzCheckpoint(p)
    from .torch_pickle import TorchCheckpoint

    return TorchCheckpoint(p, zip_format=kind == "torch-zip")


def output_format(dst: str | Path) -> str:
    """``"safetensors"``, ``"torch"`` or ``"npz"``, from the destination's extension."""
    suffix = Path(dst).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise UsageError(
            f"cannot tell the output format of {dst} from its extension; end it with .safetensors, .pth/.pt/.bin "
            f"or .npz"
        )
    return OUTPUT_FORMATS[suffix]
