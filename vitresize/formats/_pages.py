"""Give back the resident pages of a memory-mapped input, so reading a big file does not grow peak RSS.

A private read-only use of a file mapping keeps every page it touched resident (and counted in RSS) until
the mapping goes. ``MADV_DONTNEED`` drops them; the next access reads the file again. Linux only: a no-op
elsewhere, or when /proc or libc are not there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

__all__ = ["file_mappings", "release", "unwritten_mappings"]

_MADV_DONTNEED = 4


def _mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of ``path``."""
    return [(start, end) for start, end, _ in file_mappings(path)]


def file_mappings(path: Path) -> list[tuple[int, int, int]]:
    """``(start, end, file offset)`` of this process's mappings of ``path``: matched by inode, and by device or by
    the resolved path (btrfs lists its files under the file system's device, not the subvolume's that ``stat``
    gives)."""
    return [(start, end, offset) for start, end, offset, _ in _mappings_of(path, "/proc/self/maps")]


def unwritten_mappings(path: Path) -> list[tuple[int, int, int]]:
    """:func:`file_mappings` whose pages all still hold the file's bytes: none was written in this process (a
    written page of a private mapping is an anonymous copy, which ``/proc/self/smaps`` counts)."""
    return [(start, end, offset) for start, end, offset, anon in _mappings_of(path, "/proc/self/smaps") if anon == 0]


def _mappings_of(path: Path, table: str) -> list[tuple[int, int, int, int]]:
    """``(start, end, file offset, anonymous kB or -1)`` of the mappings of ``path`` listed in ``table``."""
    try:
        st = path.stat()
        lines = Path(table).read_text().splitlines()
        real = os.path.realpath(path)
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    out: list[tuple[int, int, int, int]] = []
    current: list[int] | None = None
    for line in lines:
        parts = line.split(maxsplit=5)
        if parts and "-" in parts[0] and len(parts) >= 5:  # a mapping's line; smaps adds "Field: value" lines
            current = None
            if parts[4] == str(st.st_ino) and (parts[3] == dev or parts[5:] == [real]):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                current = [start, end, int(parts[2], 16), -1]
                out.append((start, end, int(parts[2], 16), -1))
        elif current is not None and parts[:1] == ["Anonymous:"] and len(parts) >= 2:
            out[-1] = (current[0], current[1], current[2], int(parts[1]))
    return out


def release(path: Path) -> int:
    """Drop the resident pages of every mapping of ``path``; returns the bytes of address space advised.

    Only for mappings that are read, never written: a private page that was written would revert to the
    file's content.
    """
    name = ctypes.util.find_library("c")
    if name is None or not Path("/proc/self/maps").exists():
        return 0
    libc = ctypes.CDLL(name, use_errno=True)
    done = 0
    for start, end in _mappings(path):
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
            done += end - start
    return done
