"""How much of a file shares its blocks with other files (Linux ``FS_IOC_FIEMAP``): what a copy-on-write file
system (XFS with reflink, btrfs) cloned rather than copied."""

from __future__ import annotations

import fcntl
import os
import struct
import sys
from pathlib import Path

__all__ = ["shared_bytes"]

_FS_IOC_FIEMAP = 0xC020660B
_EXTENT_LAST = 0x1
_EXTENT_SHARED = 0x2000
_HEAD = struct.Struct("=QQLLLL")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQQQLLLL")  # logical, physical, length, 2 reserved, flags, 3 reserved
_BATCH = 256


def shared_bytes(path: str | os.PathLike[str]) -> int | None:
    """The bytes of ``path`` in extents the file system marks shared (cloned), or ``None`` where FIEMAP is not
    available (not Linux, or a file system without it)."""
    if not sys.platform.startswith("linux"):
        return None
    shared = 0
    start = 0
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        while True:
            buf = bytearray(_HEAD.size + _BATCH * _EXTENT.size)
            # No FIEMAP_FLAG_SYNC: it would flush the file (a copy's cost again); cloned extents are on disk
            # already, and the ones still in the page cache are copied ones.
            _HEAD.pack_into(buf, 0, start, 2**64 - 1 - start, 0, 0, _BATCH, 0)
            try:
                fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
            except OSError:
                return None
            mapped = _HEAD.unpack_from(buf, 0)[3]
            if mapped == 0:
                return shared
            for i in range(mapped):
                logical, _, length, _, _, flags, *_ = _EXTENT.unpack_from(buf, _HEAD.size + i * _EXTENT.size)
                if flags & _EXTENT_SHARED:
                    shared += length
                start = logical + length
                if flags & _EXTENT_LAST:
                    return shared
    finally:
        os.close(fd)
