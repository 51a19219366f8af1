"""The fast, seeded part of the fuzz suite (``make fuzz N=5000`` runs the long one): see tests/fuzzing.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import fuzzing
import pytest
from conftest import fixture

CASES = int(os.environ.get("VITRESIZE_FUZZ_CASES", "600"))
SEED = 20261122
PER_CASE_S = 20


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang


@pytest.mark.parametrize(
    "cases", [pytest.param(min(150, CASES), id="smoke"), pytest.param(CASES, id="full", marks=pytest.mark.slow)]
)
def test_fuzz_fast_set(tmp_path: Path, cases: int) -> None:
    """Every mutated input ends in a verified conversion or one Error: line; nothing is left behind (the first
    150 cases in ``make test``, all of them in ``make test-slow``)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    failures, kinds = [], {"converted": 0, "refused": 0, "FAIL": 0}
    try:
        for case in range(cases):
            signal.alarm(PER_CASE_S)
            try:
                o = fuzzing.run_case(SEED, case, tmp_path / "case")
            except _Hang:
                o = fuzzing.Outcome(case, "?", "?", "FAIL", f"hang: over {PER_CASE_S} s")
            finally:
                signal.alarm(0)
            kinds[o.kind] += 1
            if o.failed:
                failures.append(f"case {case} ({o.base}, {o.mutation}): {o.detail}")
    finally:
        signal.signal(signal.SIGALRM, old)
    assert not failures, "\n".join(failures[:5])
    # The mutations must exercise both outcomes, or the property says little.
    assert kinds["converted"] > cases // 10 and kinds["refused"] > cases // 3, kinds


def test_every_base_format_is_fuzzed() -> None:
    import random

    bases = {random.Random(f"{SEED}:{c}").choice(fuzzing.BASES) for c in range(CASES)}
    assert bases == set(fuzzing.BASES)


def test_harness_reports_an_escaped_exception(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import vitresize.api

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(vitresize.api, "inspect", broken)
    o = fuzzing.run_case(SEED, 0, tmp_path / "case")
    assert o.failed and "exception escaped" in o.detail and "a bug" in o.detail


def test_malicious_fixtures_are_live(tmp_path: Path) -> None:
    """Loaded unsafely, the fixtures' payload does create the marker, so its absence in the fuzz proves something."""
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    for name in ("malicious.pth", "malicious_legacy.pth"):
        subprocess.run([sys.executable, "-c", code, str(fixture(name))], cwd=tmp_path, check=False, capture_output=True)
        marker = tmp_path / fuzzing.MARKER
        assert marker.exists(), name
        marker.unlink()


def test_malicious_fixtures_are_refused_without_running(
    run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("malicious.pth", "malicious_legacy.pth"):
        for args in (["inspect", fixture(name)], ["convert", fixture(name), tmp_path / "o.pth", "--img-size", "48"]):
            res = run(*args)
            assert res.exit_code == 1 and res.stderr.startswith("Error: refused to load")
            assert "posix.system" in res.stderr
    assert list(tmp_path.iterdir()) == []
