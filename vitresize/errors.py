"""Errors raised by vitresize.

Every error a user can cause is a :class:`VitresizeError`: ``str(err)`` is one line, what is wrong and how to fix
it, naming the API's parameters (``img_size``); the CLI prints it as one ``Error:`` line naming its flags
(``--img-size``) and exits with :attr:`VitresizeError.exit_code`. A broken invariant of vitresize itself is an
:class:`InternalError`, which is not a ``VitresizeError``: it keeps its traceback everywhere.
"""

from __future__ import annotations

import re

__all__ = [
    "CheckpointFormatError",
    "DeviceError",
    "GeometryError",
    "InternalError",
    "Message",
    "MissingDependencyError",
    "NoViTFoundError",
    "OutputExistsError",
    "UnsafeCheckpointError",
    "UsageError",
    "VitresizeError",
    "param",
]

ISSUES_URL = "https://github.com/vitresize/vitresize/issues"

_PARAM = re.compile("\ue000([a-z_]+)(?:=(True|False))?\ue001")


def param(name: str, value: bool | None = None) -> str:
    """A parameter named in an error message: ``img_size`` (or ``allow_large=True``) as the API says it,
    ``--img-size`` (or ``--allow-large``, ``--no-antialias``) as the CLI does. Use it inside the message's
    f-string: ``f"pass {param('from_img_size')} HxW"``."""
    return f"\ue000{name}{'' if value is None else f'={value}'}\ue001"


def _api_name(m: re.Match[str]) -> str:
    return m.group(1) if m.group(2) is None else f"{m.group(1)}={m.group(2)}"


def _flag(m: re.Match[str]) -> str:
    flag = m.group(1).replace("_", "-")
    return f"--no-{flag}" if m.group(2) == "False" else f"--{flag}"


class Message(str):
    """A message to users (a warning, a note) that may name parameters: as a ``str`` it names them as the API
    does (``img_size``), :attr:`cli` as the command line does (``--img-size``). Build it from a text written
    with :func:`param`."""

    cli: str

    def __new__(cls, text: str) -> Message:
        raw = getattr(text, "raw", text)
        m = super().__new__(cls, _PARAM.sub(_api_name, raw))
        m.cli = _PARAM.sub(_flag, raw)
        m.raw = raw
        return m

    raw: str
    """The text with its parameters marked (:func:`param`), to build longer messages from."""


class VitresizeError(Exception):
    """Base class of the errors a user can cause. ``str(err)`` is one line: what is wrong and how to fix it."""

    exit_code: int = 1

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(Message(message), *args)  # args[0] (and repr) in the API's form

    def __str__(self) -> str:
        return str(self.message)

    @property
    def message(self) -> Message:
        """The message, to show as the API (``str``) or the command line (``.cli``) names parameters."""
        first = self.args[0] if self.args else ""
        return first if isinstance(first, Message) else Message(str(first))

    def cli_message(self) -> str:
        """The message as the command line says it: parameters named by their flags."""
        return self.message.cli


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


class MissingDependencyError(VitresizeError):
    """An optional library that the command needs is not installed; the message names the ``pip install``."""


class InternalError(AssertionError):
    """A check of vitresize's own invariants failed: a bug in vitresize, never the user's input. It is not a
    :class:`VitresizeError`, so the CLI shows its traceback; nothing was written."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} (this is a bug in vitresize, please report it: {ISSUES_URL})")
