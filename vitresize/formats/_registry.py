"""A registry whose entries are imported on first use: a run loads the code of the formats it touches, no other.

A safetensors-to-safetensors conversion of a checkpoint on a copy-on-write file system costs little more than
vitresize's start-up, so what start-up imports is most of its time: the torch pickle, zip and npz modules are
~12 ms of it (measured with ``python -X importtime``), for nothing when the input is a safetensors file.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


@dataclass(frozen=True)
class _Ref:
    """Where an entry lies: ``module`` (relative to the registry's package when it starts with a dot) and the
    dotted name of the object in it."""

    module: str
    name: str


class Registry(MutableMapping[str, T]):
    """Entries by name, in the order given: each an object, or where to import it from as a string
    ``"module:Name"`` or ``"module:Class.attribute"`` (``".safetensors:SafetensorsCheckpoint"``), imported the
    first time it is looked up, then kept. Setting an entry (``registry["toy"] = ToyCheckpoint``) registers the
    object itself.

    Args:
        entries: the entries, by name.
        package: the package relative module names are resolved in.
        make: what an imported object becomes (``WRITERS`` holds instances: its entries name the classes).

    Raises:
        KeyError: on looking up a name that is not registered.
        ImportError, AttributeError: a reference that does not resolve (a bug in the registry's own lines).
    """

    def __init__(
        self, entries: Mapping[str, T | str], *, package: str | None = None, make: Callable[[Any], T] | None = None
    ) -> None:
        self._entries: dict[str, T | _Ref] = {}
        for name, entry in entries.items():
            if isinstance(entry, str):
                module, _, attr = entry.partition(":")
                if not module or not attr:
                    raise ValueError(f"registry entry {name!r}: {entry!r} is not 'module:name'")
                self._entries[name] = _Ref(module, attr)
            else:
                self._entries[name] = entry
        self._package = package
        self._make = make
        self._lock = threading.Lock()  # batch --jobs: one import and one object per entry

    def __getitem__(self, name: str) -> T:
        entry = self._entries[name]
        if not isinstance(entry, _Ref):
            return entry
        with self._lock:
            entry = self._entries[name]
            if isinstance(entry, _Ref):
                obj: Any = importlib.import_module(entry.module, self._package)
                for part in entry.name.split("."):
                    obj = getattr(obj, part)
                loaded: T = self._make(obj) if self._make is not None else obj
                self._entries[name] = entry = loaded
            return entry

    def __setitem__(self, name: str, value: T) -> None:
        self._entries[name] = value

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def loaded(self) -> dict[str, T]:
        """The entries that are objects already (registered as objects, or imported since), without importing
        any other."""
        return {name: e for name, e in self._entries.items() if not isinstance(e, _Ref)}

    def __repr__(self) -> str:
        shown = {n: f"{e.module}:{e.name}" if isinstance(e, _Ref) else e for n, e in self._entries.items()}
        return f"Registry({shown!r})"
