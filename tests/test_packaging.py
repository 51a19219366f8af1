"""Packaging is honest: the runtime dependencies are exactly what ``vitresize/`` imports, and the wheel works alone.

The fast tests walk the AST of every ``vitresize/**/*.py`` (imports inside functions count, ``if TYPE_CHECKING:``
blocks do not) and compare the third-party modules found with ``[project].dependencies``. The slow test builds
the wheel, installs it into a fresh virtual environment (which pulls the runtime dependencies, and only them, from
the configured package index) and runs the CLI there.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the test extra installs tomli there
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vitresize"
PYPROJECT = ROOT / "pyproject.toml"
FIXTURE = ROOT / "fixtures" / "timm_vit_cls.pth"

# Modules of the test extra that must not reach an environment that installs only vitresize.
TEST_ONLY_MODULES = ("timm", "safetensors")


# ----------------------------------------------------------------------------------------------- helpers


def _canonical(name: str) -> str:
    """PEP 503 normal form of a distribution name (``Open_Clip.torch`` -> ``open-clip-torch``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    """The distribution name at the start of a PEP 508 requirement string."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert m, f"cannot read a distribution name from requirement {requirement!r}"
    return _canonical(m.group(1))


def _pyproject() -> dict[str, object]:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


def _declared_runtime() -> dict[str, str]:
    """``[project].dependencies`` as canonical name -> the requirement as written."""
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    assert "dependencies" not in project.get("dynamic", []), "dependencies must be static to be checked"
    return {_requirement_name(r): r for r in project.get("dependencies", [])}


def _declared_optional() -> dict[str, str]:
    """The extras users install for a feature (``check``, ``plot``; not ``test``/``dev``), and the model libraries
    ``vitresize check`` builds with (the user's own: timm, transformers, ...; a missing one is named with its
    ``pip install``), as canonical name -> the requirement."""
    from vitresize.fidelity.base import LIBRARIES

    extras = _pyproject()["project"].get("optional-dependencies", {})
    found = {_requirement_name(r): r for name, reqs in extras.items() if name not in ("test", "dev") for r in reqs}
    return found | {_canonical(p): p for p in LIBRARIES.values()}


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(top-level module, line) of every absolute import executed at run time: anywhere in the file (functions,
    classes, ``try`` blocks) except the body of ``if TYPE_CHECKING:`` (its ``else`` does run)."""
    yield from _imports_in(ast.iter_child_nodes(tree))


def _imports_in(nodes: Iterable[ast.AST]) -> Iterator[tuple[str, int]]:
    for node in nodes:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports_in(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.partition(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:  # relative: the package itself
            yield node.module.partition(".")[0], node.lineno
        yield from _imports_in(ast.iter_child_nodes(node))


def _third_party(module: str) -> bool:
    return module != "vitresize" and module not in sys.stdlib_module_names


def _package_imports() -> dict[str, list[str]]:
    """Third-party top-level module -> ``file:line`` places in ``vitresize/`` that import it at run time."""
    found: dict[str, list[str]] = {}
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, f"no Python files under {PACKAGE}"
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        try:
            tree = ast.parse(path.read_bytes(), filename=rel)
        except SyntaxError as e:  # someone mid-edit: say which file, not a bare traceback
            pytest.fail(f"cannot parse {rel}: {e}")
        for module, line in _runtime_imports(tree):
            if _third_party(module):
                found.setdefault(module, []).append(f"{rel}:{line}")
    return found


def _distributions_of(modules: Sequence[str]) -> dict[str, set[str]]:
    """Module -> canonical names of the installed distributions that provide it (empty: none installed does)."""
    providers = metadata.packages_distributions()
    return {m: {_canonical(d) for d in providers.get(m, [])} for m in modules}


# ----------------------------------------------------------------------------------------------- fast tests


def test_import_walk_rules() -> None:
    """The walk counts imports in functions, ``try`` and ``else`` of TYPE_CHECKING; skips its body and relatives."""
    src = """
from __future__ import annotations
import os.path
from typing import TYPE_CHECKING
import typing
if TYPE_CHECKING:
    import only_for_types
    from also_for_types import X
else:
    import in_else
if typing.TYPE_CHECKING:
    import only_for_types_too
from . import sibling
from .sub import thing
import alpha.beta as ab

def f():
    import in_function
    class C:
        from in_class import y
    try:
        import in_try
    except ImportError:
        pass
"""
    got = {m for m, _ in _runtime_imports(ast.parse(src)) if _third_party(m)}
    assert got == {"in_else", "alpha", "in_function", "in_class", "in_try"}


def test_runtime_dependencies_are_imported() -> None:
    """Every ``[project].dependencies`` entry provides a module ``vitresize/`` imports at run time."""
    declared = _declared_runtime()
    imports = _package_imports()
    provided = set().union(*_distributions_of(sorted(imports)).values())
    unused = sorted(set(declared) - provided)
    assert not unused, "\n".join(
        f"{declared[name]!r} is a runtime dependency in pyproject.toml, but vitresize/ never imports a module it "
        f"provides at run time: move it to an extra (test/dev) or drop it"
        for name in unused
    )


def test_runtime_imports_are_declared() -> None:
    """Every third-party module ``vitresize/`` imports at run time comes from a ``[project].dependencies`` entry,
    an extra of a feature (``vitresize[plot]``), or a model library of ``check``."""
    declared = _declared_runtime() | _declared_optional()
    imports = _package_imports()
    problems = []
    for module, providers in _distributions_of(sorted(imports)).items():
        where = ", ".join(imports[module][:3]) + (" ..." if len(imports[module]) > 3 else "")
        if not providers:
            problems.append(f"vitresize imports {module!r} ({where}), which no installed distribution provides")
        elif not providers & set(declared):
            problems.append(
                f"vitresize imports {module!r} ({where}), provided by {sorted(providers)}, none of which is "
                f"in [project].dependencies"
            )
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------------- slow test

# pip's output when no index (or find-links) offered anything: offline, index unreachable, no wheel for here.
_NO_INDEX = re.compile(
    r"\(from versions: none\)|NewConnectionError|Failed to establish a new connection|Network is unreachable"
    r"|Temporary failure in name resolution|Name or service not known|ConnectTimeoutError|ProxyError"
)
_TIMEOUT_BUILD_S = 300
_TIMEOUT_INSTALL_S = 1200  # torch and its CUDA wheels: ~5.5 GB unpacked, ~70 s here
_TIMEOUT_RUN_S = 300


def _clean_env() -> dict[str, str]:
    """This environment minus what would let the fresh venv see other packages or skip dependencies; pip's
    index configuration (PIP_INDEX_URL, PIP_FIND_LINKS, ...) is kept."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "CONDA_PREFIX", "__PYVENV_LAUNCHER__"}
    drop |= {"PIP_NO_DEPS", "PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_USER", "PIP_REQUIRE_VIRTUALENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", NO_COLOR="1", COLUMNS="200")
    return env


def _run(cmd: Sequence[object], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    args = [str(c) for c in cmd]
    try:
        return subprocess.run(
            args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout:.0f} s: {' '.join(args)}\n{e.stdout or ''}{e.stderr or ''}")


def _tail(p: subprocess.CompletedProcess[str], lines: int = 25) -> str:
    return "\n".join((p.stdout + p.stderr).splitlines()[-lines:])


def _check(p: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"{what}: exit {p.returncode}\n$ {' '.join(map(str, p.args))}\n{_tail(p)}"
    return p


def _pip(p: subprocess.CompletedProcess[str], what: str) -> None:
    """A pip run must succeed; one that failed because no package index answered skips the test, naming why."""
    out = p.stdout + p.stderr
    if p.returncode != 0 and _NO_INDEX.search(out):
        errors = [line for line in out.splitlines() if line.startswith("ERROR") or "NewConnectionError" in line]
        pytest.skip(f"{what}: pip cannot reach a package index here ({'; '.join(errors[-2:])[:400]})")
    _check(p, what)


def _can_build_offline() -> bool:
    """This interpreter has a setuptools the build-system accepts (and, before 70.1, ``wheel``)."""
    try:
        m = re.match(r"(\d+)\.(\d+)", metadata.version("setuptools"))
    except metadata.PackageNotFoundError:
        return False
    version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return version >= (68, 0) and (version >= (70, 1) or find_spec("wheel") is not None)


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of the checkout, so the build leaves no ``build/`` or ``*.egg-info`` in it."""
    src = tmp_path / "src"

    def skip(directory: str, names: list[str]) -> set[str]:
        top = Path(directory) == ROOT  # build/ and dist/ only at the root: a subpackage may be named so
        return {
            n
            for n in names
            if n == "__pycache__"
            or n.endswith((".pyc", ".egg-info"))
            or (n.startswith(".") and n.endswith("_cache"))
            or (top and n in {".git", ".venv", "build", "dist"})
        }

    shutil.copytree(ROOT, src, ignore=skip)
    out = tmp_path / "wheelhouse"
    cmd: list[object] = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", out, src]
    if _can_build_offline():
        cmd.insert(5, "--no-build-isolation")
    _pip(_run(cmd, cwd=tmp_path, timeout=_TIMEOUT_BUILD_S), "pip wheel")
    wheels = sorted(out.glob("vitresize-*.whl"))
    assert len(wheels) == 1, f"expected one vitresize wheel in {out}, found {[w.name for w in wheels]}"
    return wheels[0]


def _check_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        assert len(dist_info) == 1, dist_info
        (info,) = dist_info
        assert "vitresize/py.typed" in names
        assert {n.split("/")[0] for n in names} == {"vitresize", info}, "the wheel holds more than the package"
        # setuptools>=77 puts it under licenses/, older ones beside METADATA
        licenses = [n for n in names if n.startswith(f"{info}/") and n.rsplit("/", 1)[-1] == "LICENSE"]
        assert licenses, f"no LICENSE in the wheel's {info}"
        assert zf.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
        meta = zf.read(f"{info}/METADATA").decode()
    requires = re.findall(r"^Requires-Dist: (.+)$", meta, flags=re.MULTILINE)
    runtime = {_requirement_name(r) for r in requires if "extra ==" not in r}
    assert runtime == set(_declared_runtime()), f"wheel Requires-Dist {sorted(runtime)} != pyproject dependencies"


@pytest.mark.slow
def test_wheel_works_in_a_fresh_venv(tmp_path: Path) -> None:
    """The wheel alone, with only its runtime dependencies, runs ``--help``, ``convert`` and ``inspect``."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    wheel = _build_wheel(tmp_path)
    timings["build wheel"] = time.perf_counter() - t0
    _check_wheel_contents(wheel)

    venv = tmp_path / "venv"
    try:
        t0 = time.perf_counter()
        made = _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, timeout=_TIMEOUT_BUILD_S)
        if made.returncode != 0 and "ensurepip" in made.stdout + made.stderr:
            pytest.skip(f"python -m venv cannot install pip here: {_tail(made, 3)}")
        _check(made, "python -m venv")
        timings["create venv"] = time.perf_counter() - t0
        python, vitresize = venv / "bin" / "python", venv / "bin" / "vitresize"

        t0 = time.perf_counter()
        install = [python, "-m", "pip", "install", "--no-compile", wheel]
        _pip(_run(install, cwd=tmp_path, timeout=_TIMEOUT_INSTALL_S), "pip install <wheel>")
        timings["pip install"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # The installed package, not the checkout (cwd is tmp_path): every module imports with the runtime
        # dependencies alone, and the test-only libraries are absent.
        probe = """
import importlib, importlib.util, json, pkgutil, sys, vitresize
mods = [m.name for m in pkgutil.walk_packages(vitresize.__path__, "vitresize.") if not m.name.endswith("__main__")]
for m in mods:
    importlib.import_module(m)
present = [n for n in sys.argv[1:] if importlib.util.find_spec(n) is not None]
print(json.dumps({"file": vitresize.__file__, "modules": len(mods), "present": present}))
"""
        imported = _run([python, "-c", probe, *TEST_ONLY_MODULES], cwd=tmp_path, timeout=_TIMEOUT_RUN_S)
        got = json.loads(_check(imported, "import every vitresize module").stdout)
        assert Path(got["file"]).resolve().is_relative_to(venv.resolve()), (
            f"imported vitresize from {got['file']}, not the venv"
        )
        assert got["modules"] > 5, got
        assert got["present"] == [], f"test-only libraries installed with the wheel: {got['present']}"
        for name in TEST_ONLY_MODULES:
            p = _run([python, "-c", f"import {name}"], cwd=tmp_path, timeout=_TIMEOUT_RUN_S)
            assert p.returncode != 0 and "ModuleNotFoundError" in p.stderr, f"import {name}: {_tail(p)}"

        assert "convert" in _check(_run([vitresize, "--help"], cwd=tmp_path, timeout=_TIMEOUT_RUN_S), "--help").stdout
        out = tmp_path / "out.safetensors"
        convert = [vitresize, "convert", FIXTURE, out, "--img-size", "48"]
        _check(_run(convert, cwd=tmp_path, timeout=_TIMEOUT_RUN_S), "convert")
        assert out.is_file()
        _check(_run([vitresize, "inspect", out], cwd=tmp_path, timeout=_TIMEOUT_RUN_S), "inspect")
        report = json.loads(
            _check(_run([vitresize, "inspect", out, "--json"], cwd=tmp_path, timeout=_TIMEOUT_RUN_S), "inspect").stdout
        )
        assert [m["grid"] for m in report["models"]] == [[6, 6]], report["models"]
        timings["run CLI"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~5.5 GB with CUDA torch; pytest keeps 3 tmp_path trees
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
