"""The reader interface every format implements. Pure Python; tensors are only touched through it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from ..keymaps import TensorInfo

if TYPE_CHECKING:
    import torch

    from .sidecar import Sidecar

__all__ = ["ROOT", "Checkpoint", "nonfinite"]

ROOT = ""
"""Name of the state dict when the file is a flat state dict (no container around it)."""


def nonfinite(t: torch.Tensor) -> int:
    """NaN and Inf elements of a tensor (0 for integer dtypes)."""
    import torch

    if not t.is_floating_point():
        return 0
    if t.element_size() == 1:  # float8: torch.isfinite has no kernel for some of them; every value fits float32
        t = t.float()
    return int((~torch.isfinite(t)).sum())


class Checkpoint(ABC):
    """An opened checkpoint: its state dicts' shapes and dtypes, read without materializing tensor data.

    Attributes:
        path: the file.
        format: ``"safetensors"``, ``"torch-zip"`` or ``"torch-legacy"``.
        metadata: string metadata stored in the file (safetensors ``__metadata__``), else empty.
        state_dicts: every model-like dict, by name (``"model"``, ``"model_ema"``; ``""`` for a flat file),
            mapping keys to :class:`TensorInfo`.
        extras: container entries that are not state dicts (``epoch``, ``args``, ``optimizer``, ...).
        lazy: tensor data is read on demand (safetensors, torch zip via mmap), not all loaded up front.
    """

    path: Path
    format: str
    metadata: dict[str, str]
    state_dicts: dict[str, dict[str, TensorInfo]]
    extras: list[str]
    lazy: bool
    sidecar: Sidecar | None = None
    """The ``config.json`` beside the file (or in the folder), set by :func:`open_checkpoint`."""

    @abstractmethod
    def tensor(self, state_dict: str, key: str) -> torch.Tensor:
        """Materialize one tensor on the CPU."""

    def count_nonfinite(self, state_dict: str, key: str) -> int:
        """NaN and Inf elements of one tensor (0 for integer dtypes)."""
        return nonfinite(self.tensor(state_dict, key))

    def raw_bytes(self, state_dict: str, key: str) -> bytes | None:
        """One tensor's little-endian bytes read without torch, or ``None`` where the format cannot."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles and mappings."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
