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
    first time it is looked up, then kept. Setting an entry takes either (``registry["toy"] = ToyCheckpoint``).
    ``name in registry`` imports nothing; lookups, ``get`` and ``values`` import what they return. Safe to use
    from several threads (``batch --jobs``): an entry is imported and made once.

    Args:
        entries: the entries, by name.
        package: the package relative module names are resolved in.
        make: what an imported object becomes (``WRITERS`` holds instances: its entries name the classes).

    Raises:
        KeyError: on looking up a name that is not registered.
        ValueError: a string entry that is not ``"module:name"``.
        ImportError, AttributeError: a reference that does not resolve (a bug in the registry's own lines).
    """

    def __init__(
        self, entries: Mapping[str, T | str], *, package: str | None = None, make: Callable[[Any], T] | None = None
    ) -> None:
        self._package = package
        self._make = make
        self._lock = threading.RLock()  # reentrant: an imported module may look the registry up
        self._entries: dict[str, T | _Ref] = {}
        self._sources: dict[str, str] = {}
        for name, entry in entries.items():
            self[name] = entry

    def __getitem__(self, name: str) -> T:
        entry = self._entries[name]
        if not isinstance(entry, _Ref):
            return entry
        with self._lock:
            entry = self._entries[name]
            if not isinstance(entry, _Ref):  # another thread imported it meanwhile
                return entry
            obj: Any = importlib.import_module(entry.module, self._package)
            for part in entry.name.split("."):
                obj = getattr(obj, part)
            made: T = self._make(obj) if self._make is not None else obj
            if self._entries.get(name) is entry:  # not replaced or deleted while importing
                self._entries[name] = made
            return made

    def __setitem__(self, name: str, value: T | str) -> None:
        with self._lock:
            if isinstance(value, str):
                module, _, attr = value.partition(":")
                if not module or not attr:
                    raise ValueError(f"registry entry {name!r}: {value!r} is not 'module:name'")
                self._entries[name] = _Ref(module, attr)
                self._sources[name] = value
            else:
                self._entries[name] = value
                self._sources.pop(name, None)

    def __delitem__(self, name: str) -> None:
        with self._lock:
            del self._entries[name]
            self._sources.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __copy__(self) -> Registry[T]:
        with self._lock:
            copy: Registry[T] = Registry({}, package=self._package, make=self._make)
            copy._entries, copy._sources = dict(self._entries), dict(self._sources)
            return copy

    def loaded(self) -> dict[str, T]:
        """The entries that are objects already (registered as objects, or imported since), without importing
        any other."""
        return {name: e for name, e in self._entries.items() if not isinstance(e, _Ref)}

    def sources(self) -> dict[str, str]:
        """Where each entry registered by reference comes from (``"module:name"``), imported yet or not."""
        return dict(self._sources)

    def __repr__(self) -> str:
        shown = {n: f"{e.module}:{e.name}" if isinstance(e, _Ref) else e for n, e in self._entries.items()}
        return f"Registry({shown!r})"
