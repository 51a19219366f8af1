"""Errors raised by vitresize.

Every error a user can cause is a :class:`VitresizeError`. The CLI prints it as one ``Error:`` line and
exits with :attr:`VitresizeError.exit_code`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "CheckpointFormatError",
    "DeviceError",
    "GeometryError",
    "NoViTFoundError",
    "OutputExistsError",
    "UnsafeCheckpointError",
    "UsageError",
    "VitresizeError",
]


class VitresizeError(Exception):
    """Base class of the errors a user can cause. ``str(err)`` is one line: what is wrong and how to fix it."""

    exit_code: int = 1


class UsageError(VitresizeError, ValueError):
    """The options contradict each other or cannot describe a valid target (exit code 2)."""

    exit_code = 2


class CheckpointFormatError(VitresizeError):
    """The file is missing, unreadable, corrupt, or in a format vitresize does not read or write."""


class UnsafeCheckpointError(CheckpointFormatError):
    """The file would need code execution to load (a pickle global outside the allow-list, TorchScript)."""


class NoViTFoundError(VitresizeError):
    """No position embedding of a supported family was found in the checkpoint."""


class GeometryError(VitresizeError):
    """The source grid or prefix-token layout cannot be inferred, or contradicts the options given."""


class OutputExistsError(VitresizeError):
    """The destination exists and ``force`` was not given."""


class DeviceError(VitresizeError):
    """The requested compute device is not available."""
