"""A zip writer whose members' data land where a copy-on-write file system clones them (``.npz`` and ``.pth``).

A member is written from memory, or copied from a byte range of another file (a member of the input archive, a
storage of a mapped checkpoint) by the copy engine (:func:`._copy.start_copier`: ``copy_file_range`` in the
kernel). A copy-on-write file system (XFS with reflink, btrfs, ZFS block cloning) clones such a copy instead of
copying it only where source and destination offsets are congruent modulo the block size, so each large copied
member's local header is padded (an extra field of filler bytes, as ``torch.save``'s own writer pads to 64)
until its data starts at an offset congruent to its source's (unless that would leave data that asks for an
alignment misaligned from 8 bytes: a safetensors file's tensors may lie anywhere). Smaller members are not placed
congruent (a block of padding would cost more than it saves); they, and the members written from memory, start
at a multiple of ``Member.align`` (64 for torch's storages, 1 for ``.npz`` members).

The layout follows from names and sizes alone: the file is sized up front, the copies run in a child process
while this one writes the members held in memory and computes the CRC-32 of copied members whose CRC is not
known, and the headers and the central directory go in last. ZIP64 records are written where a size or an offset
needs them, as Python's ``zipfile`` and torch's miniz read them.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointFormatError, InternalError
from . import _copy
from ._copy import Progress

__all__ = ["CLONE_MIN", "Member", "write_zip"]

CLONE_MIN = 16 * _copy.BLOCK
"""A copied member this large (64 KiB) is placed block-congruent with its source: up to a block of padding
(6 % of it at most) buys a clone of all but its first and last partial blocks."""

STORED, DEFLATED = 0, 8
_LIMIT = 0xFFFFFFFF  # a size or offset this large needs ZIP64 fields
_PAD_ID = 0x4246  # "FB": the filler extra field torch.save's writer (caffe2's serialize) pads with
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_END64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_UTF8 = 0x800
_CRC_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class Member:
    """One member of the archive.

    Attributes:
        name: its full name in the archive.
        size: its uncompressed size.
        data: its stored bytes, when they are in memory (compressed already for a deflated member).
        source: ``(file, offset)`` where its ``stored_size`` stored bytes lie, to be copied file to file.
        stored_size: the bytes stored (``size`` for a stored member; the compressed size for a deflated one).
        compress_type: :data:`STORED` or :data:`DEFLATED` (``data`` or the source's bytes, as they are).
        crc: the CRC-32 of the uncompressed data; ``None``: computed from the bytes (stored members only).
        verify: read the source's bytes and refuse them if they do not match ``crc`` (a corrupt input member).
        align: where it is not placed congruent with a source, its data starts at a multiple of this.
        date_time, external_attr: as ``zipfile.ZipInfo`` has them.
        flag_bits: general-purpose flags the method needs (the input's bits 1-2: its compression options).
    """

    name: str
    size: int
    data: bytes | memoryview | None = None
    source: tuple[Path, int] | None = None
    stored_size: int | None = None
    compress_type: int = STORED
    crc: int | None = None
    verify: bool = False
    align: int = 1
    date_time: tuple[int, int, int, int, int, int] = (1980, 1, 1, 0, 0, 0)
    external_attr: int = 0
    flag_bits: int = 0

    @property
    def stored(self) -> int:
        return self.size if self.stored_size is None else self.stored_size

    @property
    def raw_name(self) -> bytes:
        return self.name.encode("utf-8")


@dataclass
class _Placed:
    member: Member
    header: int  # offset of its local header
    padding: int  # bytes of the filler extra field (0, or 4 + filler)
    data: int  # offset of its data
    crc: int | None


def _zip64_local(m: Member) -> bool:
    return m.size >= _LIMIT or m.stored >= _LIMIT


def _place(members: Sequence[Member]) -> tuple[list[_Placed], int]:
    """Where each member's header and data go, and where the central directory starts."""
    placed = []
    at = 0
    for m in members:
        fixed = at + _LOCAL.size + len(m.raw_name) + (20 if _zip64_local(m) else 0)
        if m.source is not None and m.stored >= CLONE_MIN and m.source[1] % min(m.align, 8) == 0:
            modulus, target = _copy.BLOCK, m.source[1]
        else:
            modulus, target = max(m.align, 1), 0
        gap = (target - fixed) % modulus
        padding = gap
        while 0 < padding < 4:  # a filler field takes 4 bytes at least
            padding += modulus
        placed.append(_Placed(m, at, padding, fixed + padding, m.crc))
        at = fixed + padding + m.stored
    return placed, at


def _date(dt: tuple[int, int, int, int, int, int]) -> tuple[int, int]:
    y, mo, d, h, mi, s = dt
    return (max(y - 1980, 0) << 9) | (mo << 5) | d, (h << 11) | (mi << 5) | (s // 2)


def _flags(m: Member) -> int:
    return m.flag_bits | (0 if m.name.isascii() else _UTF8)


def _version(m: Member, zip64: bool) -> int:
    """The version needed to extract: ZIP64 4.5, bzip2 4.6, LZMA 6.3, else 2.0 (as Python's zipfile writes)."""
    return max(45 if zip64 else 20, {12: 46, 14: 63}.get(m.compress_type, 20))


def _local_header(p: _Placed) -> bytes:
    m = p.member
    date, time = _date(m.date_time)
    extra = b""
    size, stored = m.size, m.stored
    if _zip64_local(m):
        extra = struct.pack("<HHQQ", 1, 16, m.size, m.stored)
        size = stored = _LIMIT
    if p.padding:
        extra += struct.pack("<HH", _PAD_ID, p.padding - 4) + b"Z" * (p.padding - 4)
    assert p.crc is not None
    head = _LOCAL.pack(
        0x04034B50,
        _version(m, _zip64_local(m)),
        _flags(m),
        m.compress_type,
        time,
        date,
        p.crc,
        stored,
        size,
        len(m.raw_name),
        len(extra),
    )
    return head + m.raw_name + extra


def _central(placed: Sequence[_Placed], start: int) -> bytes:
    out = []
    for p in placed:
        m = p.member
        date, time = _date(m.date_time)
        fields: list[int] = []
        size, stored, offset = m.size, m.stored, p.header
        if size >= _LIMIT:
            fields.append(size)
            size = _LIMIT
        if stored >= _LIMIT:
            fields.append(stored)
            stored = _LIMIT
        if offset >= _LIMIT:
            fields.append(offset)
            offset = _LIMIT
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        version = _version(m, bool(fields) or _zip64_local(m))
        assert p.crc is not None
        out.append(
            _CENTRAL.pack(
                0x02014B50,
                (3 << 8) | version,  # made by: Unix
                version,
                _flags(m),
                m.compress_type,
                time,
                date,
                p.crc,
                stored,
                size,
                len(m.raw_name),
                len(extra),
                0,
                0,
                0,
                m.external_attr,
                offset,
            )
            + m.raw_name
            + extra
        )
    directory = b"".join(out)
    count, size = len(placed), len(directory)
    tail = b""
    if count >= 0xFFFF or size >= _LIMIT or start >= _LIMIT:
        end64 = start + size
        tail = _END64.pack(0x06064B50, _END64.size - 12, 45, 45, 0, 0, count, count, size, start)
        tail += _LOCATOR64.pack(0x07064B50, 0, end64, 1)
    entries = min(count, 0xFFFF)
    tail += _END.pack(0x06054B50, 0, 0, entries, entries, min(size, _LIMIT), min(start, _LIMIT), 0)
    return directory + tail


def _crc_of_range(fd: int, m: Member) -> int:
    """The CRC-32 of a copied member's data read from its source: its stored bytes, or what they inflate to (at
    most its ``size``, inflated a chunk at a time: a member that inflates to more is refused).

    Raises:
        CheckpointFormatError: the source is cut short, or its bytes do not inflate to ``size`` bytes.
    """
    assert m.source is not None
    path, offset = m.source
    where = f"{path}: member {m.name!r}"
    crc = produced = 0
    inflate = zlib.decompressobj(-zlib.MAX_WBITS) if m.compress_type == DEFLATED else None
    length = m.stored
    try:
        while length > 0:
            chunk = os.pread(fd, min(length, _CRC_CHUNK), offset)
            if not chunk:
                raise CheckpointFormatError(f"{where} is cut short (truncated file?); re-download or re-save it")
            offset += len(chunk)
            length -= len(chunk)
            while chunk:
                data = inflate.decompress(chunk, _CRC_CHUNK) if inflate is not None else chunk
                chunk = inflate.unconsumed_tail if inflate is not None else b""
                produced += len(data)
                if produced > m.size:
                    raise CheckpointFormatError(
                        f"{where} inflates past its declared {m.size} bytes (corrupt or crafted?); re-download or "
                        f"re-save it"
                    )
                crc = zlib.crc32(data, crc)
    except zlib.error as e:
        raise CheckpointFormatError(f"{where} is corrupt ({e}); re-download or re-save it") from None
    if produced != m.size:
        raise CheckpointFormatError(
            f"{where} holds {produced} bytes, its header says {m.size} (corrupt?); re-download or re-save it"
        )
    return crc


def _check_sources(members: Sequence[Member], fds: dict[Path, int]) -> None:
    """Refuse a member whose source range runs past the end of its file (a crafted or cut directory)."""
    for m in members:
        if m.source is not None:
            path, offset = m.source
            end = os.fstat(fds[path]).st_size
            if offset < 0 or offset + m.stored > end:
                raise CheckpointFormatError(
                    f"{path}: member {m.name!r} declares {m.stored} bytes at offset {offset}, past the end of the "
                    f"file ({end} bytes; truncated or corrupt?); re-download or re-save it"
                )


def write_zip(dst: Path, members: Sequence[Member], progress: Progress | None = None) -> int:
    """Write a zip archive of ``members``, in order, to ``dst`` (a fresh file); returns its size.

    Raises:
        CheckpointFormatError: a copied member's bytes do not match its CRC (``verify``), do not inflate to its
            size, or lie past the end of its source.
        OSError: reading a source or writing ``dst`` failed.
        InternalError: members that contradict themselves (a bug of the caller).
    """
    for m in members:
        if m.data is not None and len(m.data) != m.stored:
            raise InternalError(f"zip member {m.name!r} has {len(m.data)} bytes, planned {m.stored}")
        if (m.data is None) == (m.source is None):
            raise InternalError(f"zip member {m.name!r} needs data or a source, not both")
        if m.compress_type != STORED and m.crc is None:
            raise InternalError(f"zip member {m.name!r} is compressed: its CRC must be given")
    placed, directory_start = _place(members)
    with _copy.Output() as out:
        fds = {m.source[0]: out.source(m.source[0]) for m in members if m.source is not None}
        _check_sources(members, fds)
        copies: _copy.Copies = [
            (fds[p.member.source[0]], p.member.source[1], p.member.stored, p.data)
            for p in placed
            if p.member.source is not None
        ]
        fd = out.create(dst, directory_start)
        copier = out.start(copies, progress)
        for p in placed:
            m = p.member
            if m.data is not None:
                _copy.write_all(fd, memoryview(m.data).cast("B"), p.data, progress)
                if p.crc is None:
                    p.crc = zlib.crc32(m.data)
            elif m.source is not None and (p.crc is None or m.verify):
                got = _crc_of_range(fds[m.source[0]], m)
                if p.crc is not None and got != p.crc:
                    raise CheckpointFormatError(
                        f"{m.source[0]}: member {m.name!r} does not match its CRC-32 (corrupt file?); re-download "
                        f"or re-save it"
                    )
                p.crc = got
            if copier.failed():
                break
        out.join()
        for p in placed:
            _copy.write_all(fd, memoryview(_local_header(p)), p.header)
        tail = _central(placed, directory_start)
        _copy.write_all(fd, memoryview(tail), directory_start)
        return directory_start + len(tail)
