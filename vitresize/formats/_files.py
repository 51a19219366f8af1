"""Reading files of an untrusted source: regular files only, JSON within budgets.

Inputs are read as regular files only: a FIFO, a device or a socket is refused before it is opened (and a
file swapped for one is opened ``O_NONBLOCK`` and refused by ``fstat``), so reading never blocks. JSON files
(``config.json``, shard indexes) are refused unread above :data:`MAX_JSON_BYTES`, and once parsed if nested
deeper than :data:`MAX_JSON_DEPTH` or holding a number that is not finite.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import IO, Any

from ..errors import CheckpointFormatError
from ._json import loads, too_deep

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "describe_kind", "is_folder", "open_regular", "read_json"]

MAX_JSON_BYTES = 16 << 20
"""The largest ``config.json`` or shard index read (16 MiB): model configs are a few KiB, and the index of a
model with a hundred thousand tensors a few MiB; anything bigger is refused unread."""
MAX_JSON_DEPTH = 128
"""The deepest nesting of arrays and objects accepted in a JSON file (model configs nest 3 or 4 levels)."""


def is_folder(path: Path) -> bool:
    """``path.is_dir()``, ``False`` on any error (Python < 3.12 raises on a name too long for the file system)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def describe_kind(mode: int) -> str:
    """``"a named pipe (FIFO)"``, ``"a character device"``, ...: what a non-regular file is, from its mode."""
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)


def _nonblocking_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))


def open_regular(path: Path, *, follow: bool = True, fix: str = "pass a checkpoint file instead") -> IO[bytes]:
    """Open a regular file to read; anything else is refused without blocking.

    ``stat`` first (a FIFO, device or socket is never opened), then an ``O_NONBLOCK`` open checked with
    ``fstat``, so a file swapped for a FIFO in between cannot block either. With ``follow=False`` a link in
    the last component is refused too (for a path already resolved). ``fix`` ends the error for a file that
    is not regular.

    Raises:
        CheckpointFormatError: missing, unreadable, or not a regular file.
    """
    try:
        st = path.stat()
        if stat.S_ISREG(st.st_mode):
            f = open(path, "rb", opener=_nonblocking if follow else _nonblocking_nofollow)  # noqa: SIM115
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode):
                return f
            f.close()
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path} does not exist; check the path") from None
    except OSError as e:
        raise CheckpointFormatError(f"cannot read {path}: {e.strerror or e}") from None
    raise CheckpointFormatError(f"{path} is {describe_kind(st.st_mode)}, not a regular file; {fix}")


class _NotFinite(ValueError):
    """A number ``json`` would read as NaN or infinite (a ``NaN``/``Infinity`` literal, or ``1e999``)."""


def _no_constant(literal: str) -> float:
    raise _NotFinite(literal)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if math.isfinite(value):
        return value
    raise _NotFinite(literal)


def read_json(path: Path, what: str) -> Any:
    """Parse a small JSON file (``what`` names it in errors), read as :func:`open_regular` does, within
    :data:`MAX_JSON_BYTES` (checked before reading) and :data:`MAX_JSON_DEPTH` (measured on the parsed value,
    without recursion), its numbers finite (``json`` reads ``NaN``, ``Infinity`` and ``1e999``, which no JSON
    writer can write back).

    Raises:
        CheckpointFormatError: not a regular file, unreadable, too big, too deeply nested, or a number that is
            not finite.
        ValueError: not valid JSON (the caller says what it should have been).
    """
    with open_regular(path, fix="replace it with the file or remove it") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(MAX_JSON_BYTES + 1) if size <= MAX_JSON_BYTES else b""
    if size > MAX_JSON_BYTES or len(raw) > MAX_JSON_BYTES:
        raise CheckpointFormatError(
            f"{path} is {max(size, len(raw))} bytes, over the {MAX_JSON_BYTES >> 20} MiB a {what} may have; "
            f"check that it is the right file"
        )
    deep = f"{path} nests deeper than {MAX_JSON_DEPTH} levels, which no {what} does; fix or remove it"
    try:
        data = loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:  # json recurses: about a thousand levels end it, balanced or not
        raise CheckpointFormatError(deep) from None
    except _NotFinite as e:
        literal = str(e) if len(str(e)) <= 24 else str(e)[:20] + "..."
        raise CheckpointFormatError(
            f"{path} holds the number {literal}, which is not finite (JSON has no NaN or infinity); "
            f"replace it with a finite number or remove it"
        ) from None
    if too_deep(data, MAX_JSON_DEPTH):
        raise CheckpointFormatError(deep)
    return data
