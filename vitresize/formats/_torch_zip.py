"""``torch.save``'s zip format, with each storage copied from where it lies in an input file (block-congruent).

``torch.save`` serializes the container to a pickle whose tensors name their storages (``data/0``, ...) and
writes every storage's bytes through this process. Here torch's own ``_save`` pickles the container (the same
``data.pkl``, byte order and version records as ``torch.save``), its storages are taken aside, and
:func:`._zip_write.write_zip` writes the archive: a storage whose bytes lie as they are in an input file (a
memory-mapped zip member or safetensors tensor, found by the address of its mapping) is copied file to file,
block-congruent with its source, so a copy-on-write file system clones it; the others (the resampled tensors)
are written from memory, 64-byte aligned as torch aligns them. ``torch.load`` reads it, ``mmap=True`` included.

Two of torch's records are left out: ``.format_version`` and ``.storage_alignment`` tell ``torch.load``
(with ``torch.utils.serialization.config.load.calculate_storage_offsets``) that it may compute storage offsets
from miniz's layout instead of reading them, which a congruent layout does not follow; without them torch reads
every offset from the archive's headers, as for any archive written before torch 2.6.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._zip_write import Member, write_zip

if TYPE_CHECKING:
    from ._copy import Progress

__all__ = ["Locate", "save_zip"]

Locate = Callable[[int, int], "tuple[Path, int, int | None] | None"]
"""``(address, bytes)`` of a CPU storage -> ``(file, offset, CRC-32 or None)`` where those bytes lie unchanged."""

_ALIGN = 64  # torch.save's storage alignment
_ARCHIVE = "archive"  # the folder torch.save names its records under when it writes to a file object
_LEFT_OUT = (".format_version", ".storage_alignment")
_DATE = (1980, 0, 0, 0, 0, 0)  # as torch's writer dates its records


class _Records:
    """What ``torch.serialization._save`` writes to: small records go to torch's own writer (an in-memory
    archive), storages are kept aside."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.storages: list[tuple[str, Any, int]] = []

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        if name.startswith("data/") and not isinstance(data, (str, bytes)):
            self.storages.append((name, data, nbytes))
        else:
            self.writer.write_record(name, data, nbytes)


def _bytes_of(storage: Any, nbytes: int) -> memoryview:
    import torch

    if nbytes == 0:
        return memoryview(b"")
    flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))
    return memoryview(flat.numpy())  # type: ignore[arg-type]


def save_zip(obj: Any, dst: Path, locate: Locate, progress: Progress | None = None) -> bool:
    """Save ``obj`` as ``torch.save`` does, in a layout a copy-on-write file system clones (see the module).

    Returns:
        ``False`` (nothing written) where this torch's serialization internals are not the ones this was
        written for: the caller saves with ``torch.save``.
    """
    import torch.serialization as ts

    save = getattr(ts, "_save", None)
    opener = getattr(ts, "_open_zipfile_writer", None)
    if save is None or opener is None:
        return False
    small = io.BytesIO()
    records: _Records | None = None
    try:
        with opener(small) as writer:
            records = _Records(writer)
            save(obj, records, pickle, ts.DEFAULT_PROTOCOL, False)
    except (TypeError, AttributeError):  # other internals (a signature; skip_data's write_record_metadata)
        return False
    members = []
    try:
        with zipfile.ZipFile(io.BytesIO(small.getvalue())) as z:
            names = [i.filename.partition("/")[2] for i in z.infolist()]
            if "data.pkl" not in names or "byteorder" not in names:
                return False
            for info in z.infolist():
                name = info.filename.partition("/")[2]
                if name in _LEFT_OUT:
                    continue
                data = z.read(info)
                members.append(Member(f"{_ARCHIVE}/{name}", len(data), data=data, align=_ALIGN, date_time=_DATE))
                if name == "byteorder":
                    members += _storages(records.storages if records else [], locate)
    except zipfile.BadZipFile:  # torch wrote no CRCs (set_crc32_options(False)): let torch.save write it all
        return False
    write_zip(dst, members, progress)
    return True


def _storages(storages: list[tuple[str, Any, int]], locate: Locate) -> list[Member]:
    out = []
    for name, storage, nbytes in storages:
        if storage.device.type != "cpu":
            storage = storage.cpu()
        found = locate(storage.data_ptr(), nbytes) if nbytes else None
        name = f"{_ARCHIVE}/{name}"
        if found is not None:
            path, offset, crc = found
            member = Member(name, nbytes, source=(path, offset), crc=crc, align=_ALIGN, date_time=_DATE)
        else:
            member = Member(name, nbytes, data=_bytes_of(storage, nbytes), align=_ALIGN, date_time=_DATE)
        out.append(member)
    return out
