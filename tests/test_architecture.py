"""The package's shape: no import cycles, the layers, and a toy format plugged in through the registry.

The import graph is grimp's, built from the source: imports inside functions count (they run when the function
does), imports under ``if TYPE_CHECKING:`` do not (they never run). A package is its ``__init__``: a module that
imports its parent package, whose ``__init__`` imports it back, is a cycle.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import io
import itertools
import json
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import grimp
import pytest
import torch
from conftest import digest, fixture, leftovers

import vitresize
import vitresize.formats as formats
from vitresize.errors import CheckpointFormatError, InternalError
from vitresize.formats import MAX_JSON_BYTES, ROOT, Checkpoint, Writer
from vitresize.formats._dtypes import nbytes
from vitresize.formats.base import Segment, WriteJob, Written, replaced_segments
from vitresize.formats.safetensors import tensor_bytes
from vitresize.keymaps import TensorInfo

PKG = "vitresize"
LAYERS = ("cli", "batch", "fidelity", "api", "plans", "_execute", ("formats", "resample", "keymaps"))
"""Highest first: no module imports one of a higher layer, directly or through others. The last layer's
packages may import each other."""


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # cache_dir=None: no .grimp_cache written into the checkout.
    return grimp.build_graph(PKG, include_external_packages=True, exclude_type_checking_imports=True, cache_dir=None)


def _ours(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    mods = {m for m in graph.modules if m == PKG or m.startswith(PKG + ".")}
    return {m: graph.find_modules_directly_imported_by(m) & mods for m in mods}


def find_cycles(edges: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Import cycles, each as ``(a, b, ..., a)``: the shortest one in each strongly connected group of modules,
    then, with its closing import set aside, the next shortest, until no cycle is left."""
    left = {v: set(ws) for v, ws in edges.items()}
    cycles: list[tuple[str, ...]] = []
    while groups := _groups(left):
        for g in groups:
            cycle = min((_shortest_loop(left, v, g) for v in sorted(g)), key=len)
            cycles.append(cycle)
            left[cycle[-2]].discard(cycle[-1])
    return cycles


def _groups(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of modules that hold a cycle (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # the package has a few dozen modules: recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges[v]:
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def _shortest_loop(edges: dict[str, set[str]], start: str, group: set[str]) -> tuple[str, ...]:
    paths: dict[str, tuple[str, ...]] = {start: (start,)}
    todo = [start]
    while todo:
        nxt = []
        for v in todo:
            for w in sorted(edges[v] & group):
                if w == start:
                    return (*paths[v], start)
                if w not in paths:
                    paths[w] = (*paths[v], w)
                    nxt.append(w)
        todo = nxt
    raise AssertionError(f"{start} is in a cycle but no path leads back to it")


def _describe(graph: grimp.ImportGraph, chain: tuple[str, ...]) -> str:
    lines = []
    for a, b in itertools.pairwise(chain):
        where = ", ".join(
            f"line {d['line_number']}: {d['line_contents']}" for d in graph.get_import_details(importer=a, imported=b)
        )
        lines.append(f"  {a} -> {b}  ({where})")
    return "\n".join(lines)


def test_no_import_cycles(graph: grimp.ImportGraph) -> None:
    cycles = find_cycles(_ours(graph))
    assert not cycles, "import cycles:\n" + "\n\n".join(_describe(graph, c) for c in cycles)


def test_cycle_finder_sees_a_child_importing_its_parent_package(graph: grimp.ImportGraph) -> None:
    edges = _ours(graph)
    assert "vitresize.formats.folder" in edges["vitresize.formats"]  # the registry imports the folder format
    edges["vitresize.formats.folder"].add("vitresize.formats")  # `from . import open_file` in folder.py would do
    assert ("vitresize.formats", "vitresize.formats.folder", "vitresize.formats") in find_cycles(edges)


def test_layers(graph: grimp.ImportGraph) -> None:
    layers: list[Any] = [
        grimp.Layer(*(f"{PKG}.{m}" for m in layer), independent=False) if isinstance(layer, tuple) else f"{PKG}.{layer}"
        for layer in LAYERS
    ]
    illegal = graph.find_illegal_dependencies_for_layers(layers=layers)
    found = []
    for dep in sorted(illegal, key=lambda d: (d.importer, d.imported)):
        chains = sorted(
            " -> ".join((head, *route.middle, tail))
            for route in dep.routes
            for head in route.heads
            for tail in route.tails
        )
        found.append(f"{dep.importer} imports {dep.imported}:\n    " + "\n    ".join(chains))
    assert not found, "lower layers import higher ones:\n" + "\n".join(found)


@pytest.mark.parametrize("higher", ["api", "plans", "_execute", "cli"])
def test_formats_know_nothing_of_the_pipeline(graph: grimp.ImportGraph, higher: str) -> None:
    chain = graph.find_shortest_chain(importer=f"{PKG}.formats", imported=f"{PKG}.{higher}", as_packages=True)
    assert chain is None, " -> ".join(chain)


@pytest.mark.parametrize("pure", ["resample", "keymaps"])
def test_pure_packages_touch_no_files(graph: grimp.ImportGraph, pure: str) -> None:
    """resample (shape logic, tensor functions) and keymaps (key layouts) never import formats, which alone
    touches files."""
    chain = graph.find_shortest_chain(importer=f"{PKG}.{pure}", imported=f"{PKG}.formats", as_packages=True)
    assert chain is None, " -> ".join(chain)


@pytest.mark.parametrize(
    ("imported", "only"),
    [("rich", {"vitresize._render"}), ("typer", {"vitresize.cli"}), ("vitresize._render", {"vitresize.cli"})],
)
def test_only_one_module_imports(graph: grimp.ImportGraph, imported: str, only: set[str]) -> None:
    assert graph.find_modules_that_directly_import(imported) == only


@pytest.mark.parametrize("leaf", ["errors", "options", "budgets", "report", "_verify"])
def test_leaf_modules_import_no_pipeline(graph: grimp.ImportGraph, leaf: str) -> None:
    for higher in ("cli", "_render", "api", "plans", "_execute"):
        chain = graph.find_shortest_chain(importer=f"{PKG}.{leaf}", imported=f"{PKG}.{higher}")
        assert chain is None, " -> ".join(chain)


def test_errors_import_nothing_of_vitresize(graph: grimp.ImportGraph) -> None:
    assert not _ours(graph)[f"{PKG}.errors"]


# A toy format, as the module vitresize/formats/toy.py of CONTRIBUTING.md's "Adding a format": the magic, the length
# of a JSON header (little-endian u64), the header (metadata, and each tensor's key, dtype and shape, in order), then
# the tensors' raw little-endian bytes back to back, in that order.

TOY_MAGIC = b"VTTOY\x00\x01\x00"


class ToyCheckpoint(Checkpoint):
    """A ``.toy`` file: one flat state dict, read lazily; every tensor's bytes lie as they are in the file."""

    writer: ClassVar[str] = "toy"
    magic: ClassVar[bytes] = TOY_MAGIC

    def __init__(self, path: Path) -> None:
        self.path, self.format, self.lazy, self.extras = path, "toy", True, []
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(len(TOY_MAGIC) + 8)
            if len(head) < len(TOY_MAGIC) + 8 or not head.startswith(TOY_MAGIC):
                raise CheckpointFormatError(f"{path} is not a .toy file")
            (n,) = struct.unpack("<Q", head[len(TOY_MAGIC) :])
            if n > min(size - len(head), MAX_JSON_BYTES):  # check sizes before reading
                raise CheckpointFormatError(f"{path}: header of {n} bytes in a file of {size} (corrupt?)")
            header = json.loads(f.read(n))  # a real reader also checks every field's type
        self.metadata = header["metadata"]
        self.offsets: dict[str, int] = {}
        infos: dict[str, TensorInfo] = {}
        at = len(TOY_MAGIC) + 8 + n
        for t in header["tensors"]:
            info = infos[t["key"]] = TensorInfo(tuple(t["shape"]), t["dtype"])
            self.offsets[t["key"]] = at
            at += nbytes(info.shape, info.dtype)
        if at != size:
            raise CheckpointFormatError(f"{path} holds {size} bytes, its header says {at} (truncated or corrupt?)")
        self.state_dicts = {ROOT: infos}

    def segments(self, state_dict: str) -> list[Segment]:
        return [
            Segment(
                key,
                info.dtype,
                info.shape,
                nbytes(info.shape, info.dtype),
                functools.partial(self.tensor, state_dict, key),
                source=(self.path, self.offsets[key]),
            )
            for key, info in self.state_dicts[state_dict].items()
        ]

    def raw_bytes(self, state_dict: str, key: str) -> bytes:
        info = self.state_dicts[state_dict][key]
        with open(self.path, "rb") as f:
            f.seek(self.offsets[key])
            return f.read(nbytes(info.shape, info.dtype))

    def tensor(self, state_dict: str, key: str) -> torch.Tensor:
        info = self.state_dicts[state_dict][key]
        dtype = getattr(torch, info.dtype)
        raw = self.raw_bytes(state_dict, key)
        if not raw:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(info.shape)


class ToyWriter(Writer):
    """``.toy``: one flat state dict, the input's metadata and the conversion's provenance; source byte ranges
    copied as they are, the resampled tensors' bytes written from memory."""

    format: ClassVar[str] = "toy"
    suffixes: ClassVar[tuple[str, ...]] = (".toy",)
    keeps_metadata: ClassVar[bool] = True
    stores_every_element: ClassVar[bool] = True

    def writes_raw(self, ckpt: Checkpoint) -> bool:
        return True  # tensor_bytes() takes torchfree's numpy tables as well as tensors

    def write(self, out: Path, job: WriteJob, progress: Callable[[int], None] | None) -> Written:
        segments = replaced_segments(job.checkpoint, job.state_dicts[0], job.replacements)
        header = {
            "metadata": {**job.checkpoint.metadata, **job.metadata},
            "tensors": [{"key": s.key, "dtype": s.dtype, "shape": list(s.shape)} for s in segments],
        }
        head = json.dumps(header).encode()
        with open(out, "wb") as f:
            f.write(TOY_MAGIC + struct.pack("<Q", len(head)) + head)
            for s in segments:
                if s.source is None:
                    raw = tensor_bytes(s.load())
                    if len(raw) != s.nbytes:
                        raise InternalError(f"{s.key} produced {len(raw)} bytes, expected {s.nbytes}")
                    f.write(raw)
                else:
                    _copy_range(f, *s.source, s.nbytes)
                if progress:
                    progress(s.nbytes)
            return Written(f.tell())


def _copy_range(f: io.BufferedWriter, path: Path, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        end = offset + length
        while offset < end:
            chunk = os.pread(fd, min(1 << 20, end - offset), offset)
            if not chunk:
                raise CheckpointFormatError(f"{path} ended at byte {offset}, expected {end} (truncated?)")
            f.write(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the toy format as vitresize/formats/__init__.py would, one line each: the writer in WRITERS, the
    reader in READERS (sniff() knows it by its magic)."""
    monkeypatch.setitem(formats.WRITERS, "toy", ToyWriter())
    monkeypatch.setitem(formats.READERS, "toy", ToyCheckpoint)


SRC = fixture("timm_vit_cls.pth")


def test_toy_format_round_trip(toy: None, tmp_path: Path) -> None:
    dst = tmp_path / "out.toy"
    report = vitresize.convert(SRC, dst, img_size=48, verify=True)
    assert report.dst_format == "toy"
    assert leftovers(tmp_path) == []
    assert [c.key for c in report.plan.changes] == ["pos_embed"]

    reference = vitresize.convert(SRC, tmp_path / "out.safetensors", img_size=48)
    with formats.open_file(SRC) as src, formats.open_file(dst) as out, formats.open_file(reference.dst) as ref:
        assert isinstance(out, ToyCheckpoint)  # sniffed by its content
        assert out.metadata["vitresize.source"] == SRC.name
        assert list(out.state_dicts[ROOT]) == list(src.state_dicts[ROOT])
        assert out.state_dicts[ROOT]["pos_embed"] == TensorInfo((1, 1 + 6 * 6, 16), "float32")
        for key in src.state_dicts[ROOT]:
            if key != "pos_embed":
                assert digest(out.tensor(ROOT, key)) == digest(src.tensor(ROOT, key)), key
        # the resampled table is the one any other writer stores
        assert digest(out.tensor(ROOT, "pos_embed")) == digest(ref.tensor(ROOT, "pos_embed"))

    assert report.verified is not None
    assert report.verified.tensors == len(src.state_dicts[ROOT]) - 1
    assert report.verified.bytes == sum(
        nbytes(i.shape, i.dtype) for k, i in src.state_dicts[ROOT].items() if k != "pos_embed"
    )


class _CorruptingToyWriter(ToyWriter):
    """Writes a ``.toy`` with one byte of ``cls_token`` (a pass-through tensor) flipped: same shapes and dtypes."""

    def write(self, out: Path, job: WriteJob, progress: Callable[[int], None] | None) -> Written:
        written = super().write(out, job, progress)
        at = ToyCheckpoint(out).offsets["cls_token"]
        with open(out, "r+b") as f:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ 0xFF]))
        return written


def test_toy_format_verify_reads_through_the_toy_reader(
    toy: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(formats.WRITERS, "toy", _CorruptingToyWriter())
    dst = tmp_path / "out.toy"
    vitresize.convert(SRC, dst, img_size=48, force=True)  # the plan's shapes and dtypes still hold: written
    dst.unlink()
    with pytest.raises(InternalError, match="differs from the input"):
        vitresize.convert(SRC, dst, img_size=48, verify=True)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_toy_format_from_the_cli(toy: None, tmp_path: Path, run: Any) -> None:
    dst = tmp_path / "out.toy"
    result = run("convert", SRC, dst, "--img-size", "48", "--verify", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dst_format"] == "toy"


def test_unknown_extension_lists_the_registered_ones(toy: None, tmp_path: Path) -> None:
    with pytest.raises(vitresize.UsageError, match=r"\.toy"):
        vitresize.convert(SRC, tmp_path / "out.unknown", img_size=48)


# The registries import a format's module when a file of that format is read or written (formats/_registry.py).


@pytest.fixture
def probe_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Callable[[str], str]:
    """``probe_module(source)``: the name of a new importable module of that source, not imported yet, and
    forgotten after the test."""

    def write(source: str) -> str:
        name = f"vitresize_probe_{tmp_path.name}"
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        request.addfinalizer(lambda: sys.modules.pop(name, None))
        return name

    return write


def test_registry_imports_an_entry_on_first_lookup(probe_module: Callable[[str], str]) -> None:
    from vitresize.formats._registry import Registry

    probe = probe_module("class Thing:\n    class Inner:\n        pass\n")
    made: list[type] = []

    def make(cls: type) -> type:
        made.append(cls)
        return cls

    reg: Registry[Any] = Registry({"thing": f"{probe}:Thing", "inner": f"{probe}:Thing.Inner", "obj": int}, make=make)
    assert list(reg) == ["thing", "inner", "obj"] and len(reg) == 3
    assert "inner" in reg and "nothing" not in reg and probe not in sys.modules  # `in` imports nothing
    assert reg.loaded() == {"obj": int}  # an object registered as such is not passed through make
    assert reg.sources() == {"thing": f"{probe}:Thing", "inner": f"{probe}:Thing.Inner"}
    assert reg["inner"].__qualname__ == "Thing.Inner"
    assert probe in sys.modules
    assert set(reg.loaded()) == {"inner", "obj"}
    assert reg["inner"] is reg["inner"] and made == [reg["inner"]]  # imported and made once
    reg["toy"] = str
    reg["later"] = f"{probe}:Thing"  # a reference, as in the constructor
    del reg["thing"]
    assert list(reg) == ["inner", "obj", "toy", "later"] and reg["toy"] is str and reg["later"].__name__ == "Thing"
    copied = copy.copy(reg)
    copied["extra"] = int
    assert "extra" not in reg and list(copied) == [*reg, "extra"]
    with pytest.raises(KeyError):
        reg["thing"]
    with pytest.raises(ValueError, match="not 'module:name'"):
        Registry({"bad": "no_colon"})


def test_registry_imports_once_across_threads(probe_module: Callable[[str], str]) -> None:
    """batch --jobs: threads that look up an entry while it is being imported get the one object made."""
    from vitresize.formats._registry import Registry

    probe = probe_module("import time\ntime.sleep(0.2)\n\nclass W:\n    pass\n")
    reg: Registry[Any] = Registry({"w": f"{probe}:W"}, make=lambda cls: cls())
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: reg["w"], range(8)))
    assert all(w is got[0] for w in got)


def test_lazily_registered_readers_have_no_magic() -> None:
    """sniff() reads the signatures of the readers registered as objects only, so as not to import every format
    for each file: a reader with a magic of its own must be registered as its class (CONTRIBUTING.md)."""
    for name in list(formats.READERS):
        reader = formats.READERS[name]  # imports it
        assert getattr(reader, "magic", b"") == b"", name
    from vitresize.formats.folder import FolderWriter, ShardedCheckpoint

    assert FolderWriter.format == ShardedCheckpoint.writer == formats.FOLDER
    assert [formats.WRITERS[n].format for n in formats.WRITERS] == list(formats.WRITERS)


@pytest.mark.parametrize("registry", ["READERS", "WRITERS"])
def test_registry_references_stay_in_the_formats_package(registry: str) -> None:
    """grimp's graph cannot see a module named in a string: each must be a module of vitresize/formats itself, so
    the layer and cycle checks above still cover what the registries import."""
    sources = getattr(formats, registry).sources()
    assert sources
    for name, source in sources.items():
        module = source.partition(":")[0]
        assert module.startswith(".") and module[1:].isidentifier(), (name, source)
        assert (Path(formats.__file__).parent / f"{module[1:]}.py").is_file(), (name, source)
