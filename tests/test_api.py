"""The typed public API: ``Target`` and ``Options``, ``plan``/``convert`` given objects or keywords, errors that
name parameters in Python and flags on the command line, ``InternalError`` for vitresize's own bugs, and the
public names."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, file_digest, fixture, leftovers

import vitresize
from vitresize import InternalError, Options, Target, UsageError, VitresizeError
from vitresize.errors import Message, param
from vitresize.keymaps import KEYMAPS
from vitresize.resample.conventions import INTERPOLATIONS, METHODS

_MARKERS = ("\ue000", "\ue001")  # errors.param's private-use brackets: never shown to anyone


def _api_only(text: str) -> str:
    """``text`` names no flag and no raw parameter marker."""
    assert "--" not in text, text
    assert not any(m in text for m in _MARKERS), repr(text)
    return text


def _stderr_line(res: Any) -> str:
    lines: list[str] = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert not any(m in lines[0] for m in _MARKERS), repr(lines[0])
    return lines[0]


# -- Target -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "size"),
    [(384, (384, 384)), ("384", (384, 384)), ("384x512", (384, 512)), ((384, 512), (384, 512)), (" 2 X 3 ", (2, 3))],
)
def test_target_parses_sizes_into_pairs(given: Any, size: tuple[int, int]) -> None:
    t = Target(img_size=given, patch=given, grid=None, from_img_size=given)
    assert t.img_size == t.patch == t.from_img_size == size
    assert t.grid is None and t.from_grid is None
    assert Target(grid=given, from_grid=given).grid == size


def test_target_is_frozen_hashable_and_compares_by_value() -> None:
    t = Target(img_size=384, patch=16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.img_size = (224, 224)  # type: ignore[misc]
    same = Target(img_size="384x384", patch=(16, 16))
    assert t == same and hash(t) == hash(same) and len({t, same}) == 1
    assert t != Target(img_size=384) and t != Target(img_size=384, patch=8)
    assert Target() == Target() and Target().is_empty and not t.is_empty
    assert not Target(patch=8).is_empty and not Target(grid=4).is_empty and Target(from_img_size=224).is_empty


def test_target_replace_is_validated() -> None:
    t = Target(img_size=48)
    assert dataclasses.replace(t, patch="8") == Target(img_size=48, patch=8)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="give either grid or img_size"):
        dataclasses.replace(t, grid=4)  # type: ignore[arg-type]


def test_target_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        Target(384)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Target(img_sise=384)  # type: ignore[call-arg]


def test_target_grid_and_img_size_together_is_refused() -> None:
    with pytest.raises(UsageError) as e:
        Target(img_size=384, grid=24)
    text = _api_only(str(e.value))
    assert "grid" in text and "img_size" in text
    assert "--grid" in e.value.cli_message() and "--img-size" in e.value.cli_message()
    assert e.value.exit_code == 2
    assert Target(grid=24, patch=16).grid == (24, 24)  # grid goes with patch


def test_target_from_grid_and_from_img_size_together_is_refused() -> None:
    with pytest.raises(UsageError) as e:
        Target(img_size=48, from_grid=3, from_img_size=48)
    text = _api_only(str(e.value))
    assert "from_grid" in text and "from_img_size" in text
    assert "--from-grid" in e.value.cli_message() and "--from-img-size" in e.value.cli_message()


@pytest.mark.parametrize("name", ["img_size", "patch", "grid", "from_img_size", "from_grid"])
@pytest.mark.parametrize(
    ("value", "why"),
    [
        (0, "positive"),
        (-3, "positive"),
        ("abc", "not a size"),
        ("4x4x4", "not a size"),
        ("", "not a size"),
        (True, "not a size"),
        (16.0, "not a size"),
        ((16, True), "not a size"),
        ((16,), "not a size"),
        (2**21, "too large"),
        ("2097152", "too large"),
        ("9" * 5000, "too large"),
    ],
)
def test_target_invalid_size_names_the_parameter(name: str, value: Any, why: str) -> None:
    text = _refusal(Target, name, value)
    assert text.startswith(f"{name} ") and why in text
    assert len(text) < 200  # a huge value is shown cut


def _refusal(cls: Any, name: str, value: Any) -> str:
    """The API's message refusing ``cls(name=value)``, checked to name the flag in the CLI's form."""
    with pytest.raises(UsageError) as e:
        cls(**{name: value})
    assert e.value.cli_message().startswith("--" + name.replace("_", "-") + " ")
    return _api_only(str(e.value))


# -- Options ----------------------------------------------------------------------------------------------------------


def test_options_defaults() -> None:
    o = Options()
    assert dataclasses.asdict(o) == {
        "family": "auto",
        "method": "native",
        "interpolation": None,
        "antialias": None,
        "patch_method": "pi",
        "device": "cpu",
        "allow_large": False,
    }
    assert o == Options() and hash(o) == hash(Options())
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.method = "timm"  # type: ignore[misc]


def test_options_accept_every_choice() -> None:
    for family in ("auto", *KEYMAPS):
        assert Options(family=family).family == family  # type: ignore[arg-type]
    for method in ("native", *METHODS):
        assert Options(method=method).method == method  # type: ignore[arg-type]
    for interpolation in INTERPOLATIONS:
        assert Options(interpolation=interpolation).interpolation == interpolation  # type: ignore[arg-type]
    for device in ("cpu", "cuda", "cuda:0", "cuda:12"):
        assert Options(device=device).device == device  # checked for spelling only, not for presence
    assert Options(patch_method="interp", antialias=False, allow_large=True).allow_large is True


@pytest.mark.parametrize(
    ("name", "value", "listed"),
    [
        ("family", "timmy", "auto, dinov2, timm"),
        ("method", "x", "native, timm, torchvision"),
        ("interpolation", "cubic", "bicubic, bilinear, nearest, area"),
        ("patch_method", "pinv", "pi, interp"),
        ("device", "tpu", "cpu, cuda or cuda:N"),
        ("device", "cuda:", "cpu, cuda or cuda:N"),
        ("device", "CPU", "cpu, cuda or cuda:N"),
        ("device", 0, "cpu, cuda or cuda:N"),
    ],
)
def test_options_bad_choice_names_the_parameter(name: str, value: Any, listed: str) -> None:
    text = _refusal(Options, name, value)
    assert text.startswith(f"{name} {value!r} is not ") and listed in text


def test_options_method_message_lists_every_method() -> None:
    with pytest.raises(UsageError) as e:
        Options(method="x")  # type: ignore[arg-type]
    assert str(e.value) == f"method 'x' is not one of native, {', '.join(METHODS)}"


@pytest.mark.parametrize("mode", ["nearest", "area"])
def test_antialias_needs_a_smooth_interpolation(mode: str) -> None:
    with pytest.raises(UsageError) as e:
        Options(antialias=True, interpolation=mode)  # type: ignore[arg-type]
    text = _api_only(str(e.value))
    assert "antialias=True" in text and mode in text
    assert "--antialias" in e.value.cli_message() and "antialias=True" not in e.value.cli_message()
    assert Options(antialias=False, interpolation=mode).antialias is False  # type: ignore[arg-type]


def test_options_replace_is_validated() -> None:
    with pytest.raises(UsageError, match=r"^method 'x'"):
        dataclasses.replace(Options(), method="x")  # type: ignore[arg-type]


def test_literals_match_the_registries() -> None:
    """The Literal types are spelt out for type checkers: they must not drift from what is accepted."""
    assert typing.get_args(vitresize.options.Family) == ("auto", *KEYMAPS)
    assert typing.get_args(vitresize.options.Method) == ("native", *METHODS)
    assert typing.get_args(vitresize.options.Interpolation) == tuple(INTERPOLATIONS)
    assert typing.get_args(vitresize.options.PatchMethod) == ("pi", "interp")
    from vitresize.formats import WRITERS

    assert set(typing.get_args(vitresize.options.OutputFormat)) == {*WRITERS, "folder"}
    from vitresize.keymaps.base import RuleOp
    from vitresize.resample.ops import OPS

    assert set(typing.get_args(vitresize.options.Op)) == set(OPS)
    assert set(typing.get_args(RuleOp)) <= set(OPS)


def test_fields_typeddicts_match_the_dataclasses() -> None:
    from vitresize.options import OptionsFields, TargetFields

    target = [f.name for f in dataclasses.fields(Target)]
    options = [f.name for f in dataclasses.fields(Options)]
    assert list(TargetFields.__annotations__) == target
    assert list(typing.get_type_hints(OptionsFields)) == target + options


# -- plan / convert ---------------------------------------------------------------------------------------------------

_SRC = fixture("deit_distilled.pth")
_GEOMETRY: dict[str, Any] = {"img_size": 48, "patch": 4}
_CHOICES: dict[str, Any] = {"method": "deit", "interpolation": "bilinear", "patch_method": "interp"}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_kwargs_objects_and_mixed_give_identical_outputs(tmp_path: Path, suffix: str) -> None:
    target, options = Target(**_GEOMETRY), Options(**_CHOICES)
    ways: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
        "kwargs": ((), {**_GEOMETRY, **_CHOICES}),
        "objects": ((target, options), {}),
        "keywords": ((), {"target": target, "options": options}),
        "target+kwargs": ((target,), _CHOICES),
        "kwargs+options": ((), {"options": options, **_GEOMETRY}),
        "strings": ((), {"img_size": "48x48", "patch": (4, 4), **_CHOICES}),
    }
    digests = {}
    for name, (args, kwargs) in ways.items():
        dst = tmp_path / f"{name}{suffix}"
        rep = vitresize.convert(_SRC, dst, *args, **kwargs)
        assert rep.plan.target == target and rep.plan.options == options, name
        assert rep.plan.method == "deit" and rep.plan.pos_convention.interpolation == "bilinear"
        digests[name] = file_digest(dst)
    assert len(set(digests.values())) == 1, digests
    # and the options made a difference: the defaults give another file
    vitresize.convert(_SRC, tmp_path / f"default{suffix}", target)
    assert file_digest(tmp_path / f"default{suffix}") != digests["kwargs"]


def test_plan_keeps_what_was_given() -> None:
    target, options = Target(img_size=48, from_img_size=32), Options(method="timm")
    with vitresize.plan(_SRC, target, options) as p:
        assert p.target is target and p.options is options
        assert p.patch_method == "pi" and p.device == "cpu" and p.allow_large is False
    with vitresize.plan(_SRC, img_size="48", method="timm", allow_large=True) as p:
        assert p.target == Target(img_size=48) and p.options == Options(method="timm", allow_large=True)
        assert p.allow_large is True
    with vitresize.plan(_SRC, patch=8) as p:  # method "native" is kept in options; the plan says what it means
        assert p.options.method == "native" and p.method == "timm"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": Target(img_size=48), "img_size": 48}, "target= or as keywords"),
        ({"target": Target(img_size=48), "from_img_size": 32}, "target= or as keywords"),
        ({"options": Options(), "img_size": 48, "method": "timm"}, "options= or as keywords"),
        ({"img_sise": 48}, "unexpected keyword argument 'img_sise'"),
        ({"img_size": 48, "force_large": True}, "unexpected keyword argument 'force_large'"),
    ],
)
def test_plan_and_convert_refuse_a_field_given_twice_or_unknown(
    tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        vitresize.plan(_SRC, **kwargs)
    dst = tmp_path / "o.pth"
    with pytest.raises(TypeError, match=match):
        vitresize.convert(_SRC, dst, **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", [None, Target(), Target(from_img_size=32)])
def test_no_target_names_the_parameters(tmp_path: Path, target: Target | None) -> None:
    with pytest.raises(UsageError) as e:
        vitresize.plan(_SRC, target)
    text = _api_only(str(e.value))
    assert "img_size" in text and "patch" in text and "grid" in text
    assert "--img-size, --patch or --grid" in e.value.cli_message()
    with pytest.raises(UsageError):
        vitresize.convert(_SRC, tmp_path / "o.pth", target)
    assert list(tmp_path.iterdir()) == []


def test_invalid_keyword_values_are_usage_errors() -> None:
    with pytest.raises(UsageError, match=r"^img_size 'big' is not a size"):
        vitresize.plan(_SRC, img_size="big")
    with pytest.raises(UsageError, match=r"^family 'x' is not one of"):
        vitresize.plan(_SRC, img_size=48, family="x")  # type: ignore[arg-type]


def test_a_target_that_is_not_a_target_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="Target"):
        vitresize.plan(_SRC, 48)  # type: ignore[arg-type]


def test_execute_after_close_raises_and_writes_nothing(tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    p = vitresize.plan(_SRC, img_size=48)
    p.close()
    p.close()  # closing twice is harmless
    with pytest.raises(ValueError, match="closed") as e:
        p.execute(dst)
    assert not isinstance(e.value, VitresizeError)
    with pytest.raises(ValueError, match="closed"):
        p.execute(dst, dry_run=True)
    with vitresize.plan(_SRC, img_size=48) as q:
        pass
    with pytest.raises(ValueError, match="closed"):
        q.execute(dst)
    assert q.changes and q.to_dict()["new_grid"] == [6, 6]  # what was planned can still be read
    assert list(tmp_path.iterdir()) == []


def test_execute_before_close_and_twice(tmp_path: Path) -> None:
    with vitresize.plan(_SRC, img_size=48) as p:
        a = p.execute(tmp_path / "a.pth")
        b = p.execute(tmp_path / "b.pth")
    assert a.dst_format == b.dst_format == "torch" and not a.dry_run
    assert file_digest(tmp_path / "a.pth") == file_digest(tmp_path / "b.pth")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_dry_run_writes_nothing(tmp_path: Path, suffix: str) -> None:
    dst = tmp_path / f"o{suffix}"
    with vitresize.plan(_SRC, img_size=48) as p:
        rep = p.execute(dst, dry_run=True)
    assert isinstance(rep, vitresize.Report)
    assert rep.dry_run is True and rep.bytes_written == 0 and rep.plan is p and rep.dst == dst
    assert rep.to_dict()["dry_run"] is True and rep.to_dict()["command"] == "convert"
    rep = vitresize.convert(_SRC, dst, img_size=48, dry_run=True)
    assert rep.dry_run is True and rep.bytes_written == 0
    assert list(tmp_path.iterdir()) == []


# -- the same mistake: parameters in Python, flags on the command line ------------------------------------------------


def test_budget_names_allow_large(run: Any, tmp_path: Path) -> None:
    """A 576x576 grid of 16 floats from a 24 KiB source: over 10x the source and over 16 MiB."""
    src, dst = fixture("timm_vit_cls.safetensors"), tmp_path / "o.safetensors"
    with pytest.raises(UsageError) as e:
        vitresize.convert(src, dst, img_size=4608)
    text = _api_only(str(e.value))
    assert "img_size 4608 would make pos_embed" in text and "allow_large=True" in text
    assert "allow-large" not in text

    res = run("convert", src, dst, "--img-size", "4608")
    assert res.exit_code == 2
    line = _stderr_line(res)
    assert "--img-size 4608 would make pos_embed" in line and "--allow-large" in line
    assert "allow_large" not in line and "img_size" not in line
    assert line == "Error: " + e.value.cli_message()
    assert list(tmp_path.iterdir()) == []


def test_non_square_source_names_from_img_size(run: Any, tmp_path: Path) -> None:
    src, dst = fixture("timm_vit_32x48.safetensors"), tmp_path / "o.pth"
    with pytest.raises(vitresize.GeometryError) as e:
        vitresize.convert(src, dst, img_size=48)
    text = str(e.value)
    assert not any(m in text for m in _MARKERS)
    assert "pass from_img_size HxW (or from_grid HxW)" in text and "--" not in text.split(": ", 1)[1]

    res = run("convert", src, dst, "--img-size", "48")
    assert res.exit_code == 1
    line = _stderr_line(res)
    assert "pass --from-img-size HxW (or --from-grid HxW)" in line and "from_img_size" not in line
    assert list(tmp_path.iterdir()) == []

    rep = vitresize.convert(src, dst, img_size=48, from_img_size="32x48")  # and the fix works
    assert rep.plan.models[0].source.grid == (2, 3)


def test_indivisible_from_img_size_names_both_parameters(run: Any, tmp_path: Path) -> None:
    """A message with several parameters: each is named in its own form."""
    src, bad = fixture("timm_vit_32x48.safetensors"), "33x48"  # not divisible by the 16 patch
    with pytest.raises(UsageError) as e:
        vitresize.plan(src, img_size=48, from_img_size=bad)
    text = _api_only(str(e.value))
    assert text.startswith(f"from_img_size {bad} is not divisible") and "another patch" in text
    res = run("convert", src, tmp_path / "o.pth", "--img-size", "48", "--from-img-size", bad)
    assert res.exit_code == 2
    line = _stderr_line(res)
    assert line.startswith(f"Error: --from-img-size {bad} is not divisible") and "another --patch" in line


def test_inspect_note_and_geometry_from(run: Any) -> None:
    src = fixture("timm_vit_32x48.safetensors")
    # a note: the API names the parameter, the CLI's --json the flag
    (e,) = vitresize.inspect(src).embeddings
    assert e.source is None and isinstance(e.note, Message)
    assert "pass from_img_size HxW" in _api_only(e.note) and "pass --from-img-size HxW" in e.note.cli
    assert e.to_dict()["note"] == e.note
    res = run("inspect", src, "--json")
    assert res.exit_code == 0, res.stderr
    assert not any(m in res.stdout for m in _MARKERS)
    m = json.loads(res.stdout)["models"][0]
    assert "pass --from-img-size HxW (or --from-grid HxW)" in m["note"] and "from_img_size" not in m["note"]
    assert m["grid"] is None and m["geometry_from"] == ""

    # where the grid came from: "from_img_size" in Python, "--from-img-size" in --json as before this API
    info = vitresize.inspect(src, from_img_size="32x48")
    (e,) = info.embeddings
    assert e.geometry_from == "from_img_size" and info.to_dict()["models"][0]["geometry_from"] == "from_img_size"
    res = run("inspect", src, "--from-img-size", "32x48", "--json")
    m = json.loads(res.stdout)["models"][0]
    assert m["geometry_from"] == "--from-img-size" and m["grid"] == [2, 3] and m["note"] is None
    res = run("inspect", src, "--from-grid", "2x3", "--json")
    assert json.loads(res.stdout)["models"][0]["geometry_from"] == "--from-grid"
    assert vitresize.inspect(src, from_grid=(2, 3)).embeddings[0].geometry_from == "from_grid"
    assert vitresize.inspect(fixture("timm_vit_cls.pth")).embeddings[0].geometry_from == "tokens"


def test_convert_warnings_name_flags_in_the_cli(run: Any, tmp_path: Path) -> None:
    """A no_embed_class table: the plan's note is a warning, in API form in Python, in CLI form on stderr and
    in --json."""
    src = fixture("timm_vit_no_embed_class.pth")
    rep = vitresize.convert(src, tmp_path / "a.pth", img_size=48)
    (w,) = rep.warnings
    assert "pass from_img_size HxW" in _api_only(w) and "pass --from-img-size HxW" in getattr(w, "cli", "")

    res = run("convert", src, tmp_path / "b.pth", "--img-size", "48", "--json")
    assert res.exit_code == 0, res.stderr
    d = json.loads(res.stdout)
    (w,) = d["warnings"]
    assert "pass --from-img-size HxW" in w and "from_img_size" not in w
    assert d["models"][0]["note"] == w and d["models"][0]["geometry_from"] == "tokens"
    assert "Warning: " in res.stderr and "--from-img-size" in res.stderr and "from_img_size" not in res.stderr
    assert not any(m in res.stdout + res.stderr for m in _MARKERS)


def test_output_exists_names_force(run: Any, tmp_path: Path) -> None:
    dst = tmp_path / "o.pth"
    dst.write_bytes(b"old")
    res = run("convert", _SRC, dst, "--img-size", "48")
    assert res.exit_code == 1 and "--force" in _stderr_line(res)
    with pytest.raises(vitresize.OutputExistsError) as e:
        vitresize.convert(_SRC, dst, img_size=48)
    assert "force=True" in _api_only(str(e.value))


def test_message_forms() -> None:
    text = f"pass {param('from_img_size')} or {param('allow_large', True)}, or {param('antialias', False)}"
    m = Message(text)
    assert m == "pass from_img_size or allow_large=True, or antialias=False"
    assert m.cli == "pass --from-img-size or --allow-large, or --no-antialias"
    assert Message(m) == m and Message(m).cli == m.cli  # a Message of a Message keeps its marks
    err = UsageError(text)
    assert str(err) == m and err.cli_message() == m.cli and err.message.cli == m.cli
    assert str(VitresizeError("plain text")) == VitresizeError("plain text").cli_message() == "plain text"


# -- InternalError ----------------------------------------------------------------------------------------------------

# safetensors.numpy, not .torch: with a .safetensors input the conversion never imports torch (seconds saved)
_BROKEN_WRITER = """
import sys
from safetensors.numpy import load_file, save_file
from vitresize.formats.safetensors import SafetensorsWriter

real_write = SafetensorsWriter.write

def dropping(self, out, *args):
    written = real_write(self, out, *args)
    tensors = load_file(str(out))
    del tensors["norm.weight"]
    save_file(tensors, str(out))
    return written

SafetensorsWriter.write = dropping
from vitresize.cli import main
sys.argv[0] = "vitresize"
main()
"""


def _break_safetensors_writer(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    from safetensors.torch import load_file, save_file

    from vitresize.formats.safetensors import SafetensorsWriter

    real = SafetensorsWriter.write

    def broken(self: Any, out: Path, *args: Any) -> Any:
        written = real(self, out, *args)
        tensors = load_file(str(out))
        if how == "drop":
            del tensors["norm.weight"]
        else:
            tensors["norm.weight"] = tensors["norm.weight"] + 1
        save_file(tensors, str(out))
        return written

    monkeypatch.setattr(SafetensorsWriter, "write", broken)


@pytest.mark.parametrize(
    ("how", "verify", "match"),
    [
        ("drop", False, "does not hold the planned tensors"),
        ("drop", True, "does not hold the planned tensors"),
        ("alter", True, r"'norm\.weight' differs from the input"),
    ],
)
def test_a_writer_bug_is_an_internal_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str, verify: bool, match: str
) -> None:
    _break_safetensors_writer(monkeypatch, how)
    dst = tmp_path / "o.safetensors"
    with pytest.raises(InternalError, match=match) as e:
        vitresize.convert(fixture("timm_vit_cls.pth"), dst, img_size=48, verify=verify)
    assert isinstance(e.value, AssertionError) and not isinstance(e.value, VitresizeError)
    assert "this is a bug in vitresize, please report it" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_internal_error_is_no_vitresize_error() -> None:
    assert issubclass(InternalError, AssertionError) and not issubclass(InternalError, VitresizeError)
    try:
        raise InternalError("x")
    except VitresizeError:  # what a caller catches for its users' mistakes does not swallow a bug
        pytest.fail("InternalError caught as a VitresizeError")
    except AssertionError as e:
        assert str(e).startswith("x (this is a bug in vitresize, please report it: https://")


def test_cli_shows_an_internal_errors_traceback(tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("VITRESIZE_DEBUG", None)
    args = ["convert", str(fixture("timm_vit_cls.safetensors")), str(dst), "--img-size", "48"]
    proc = subprocess.run(
        [sys.executable, "-c", _BROKEN_WRITER, *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode != 0, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vitresize.errors.InternalError: ") and "does not hold the planned tensors" in last
    assert "this is a bug in vitresize, please report it" in last
    assert not any(ln.startswith("Error: ") for ln in proc.stderr.splitlines())
    assert proc.stdout == ""
    assert not dst.exists() and leftovers(tmp_path) == [] and list(tmp_path.iterdir()) == []


# -- public names -----------------------------------------------------------------------------------------------------

_PUBLIC = {
    "check",
    "CheckReport",
    "MissingDependencyError",
    "convert",
    "plan",
    "inspect",
    "Target",
    "Options",
    "Plan",
    "Report",
    "Inspection",
    "VitresizeError",
    "UsageError",
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "NoViTFoundError",
    "GeometryError",
    "OutputExistsError",
    "DeviceError",
    "InternalError",
    "__version__",
}


def test_all_lists_the_public_names() -> None:
    assert set(vitresize.__all__) == _PUBLIC
    assert len(vitresize.__all__) == len(set(vitresize.__all__))
    for name in vitresize.__all__:
        assert hasattr(vitresize, name), name
    for name in _PUBLIC - {"__version__", "InternalError", "VitresizeError"}:
        obj = getattr(vitresize, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, VitresizeError), name


def test_plans_module_and_plan_function_do_not_clash() -> None:
    import vitresize.plans

    mod = importlib.import_module("vitresize.plans")
    assert isinstance(mod, types.ModuleType) and mod.Plan is vitresize.Plan
    assert inspect.isfunction(vitresize.plan) and vitresize.plan is vitresize.api.plan
    assert vitresize.plans is mod  # the submodule attribute is the module, the function keeps its own name
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("vitresize.plan")


_MODULES = [
    "vitresize",
    "vitresize.api",
    "vitresize.options",
    "vitresize.errors",
    "vitresize.plans",
    "vitresize.report",
    "vitresize.fidelity.check",
    "vitresize.fidelity.results",
    "vitresize.fidelity.base",
    "vitresize.fidelity.metrics",
    "vitresize.plot",
]


def test_every_public_function_and_class_has_a_docstring() -> None:
    missing = []
    for modname in _MODULES:
        mod = importlib.import_module(modname)
        assert (mod.__doc__ or "").strip(), modname
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = obj.__doc__ or ""
            # a dataclass without a docstring gets "Name(field, ...)" as its __doc__
            if not doc.strip() or (inspect.isclass(obj) and doc.startswith(f"{name}(")):
                missing.append(f"{modname}.{name}")
    for obj in (
        vitresize.Plan.execute,
        vitresize.Plan.close,
        vitresize.Target.describe,
        vitresize.Target.is_empty,
        VitresizeError.cli_message,
        VitresizeError.message,
        param,
    ):
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(repr(obj))
    assert missing == []


def test_public_signatures() -> None:
    """plan/convert take target and options positionally or by name; convert takes what Plan.execute does, by
    name only."""
    kw = inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(vitresize.plan).parameters) == ["src", "target", "options", "fields"]
    params = inspect.signature(vitresize.convert).parameters
    assert list(params)[:4] == ["src", "dst", "target", "options"]
    execute = {n for n, p in inspect.signature(vitresize.Plan.execute).parameters.items() if p.kind is kw}
    assert execute == {"force", "dry_run", "select", "verify", "fsync", "progress"}
    named = {n for n, p in params.items() if p.kind is kw}
    if named:  # spelt out in the signature
        assert named == execute
    else:  # or typed as **fields: Unpack[ConvertFields]
        fields = typing.get_type_hints(vitresize.options.ConvertFields)
        assert set(fields) == execute | {f.name for f in dataclasses.fields(Target) + dataclasses.fields(Options)}
    with pytest.raises(TypeError):
        vitresize.convert(_SRC, "o.pth", None, None, True)  # type: ignore[call-arg]
    init = inspect.signature(Target.__init__).parameters.values()
    assert all(p.kind is kw for p in init if p.name != "self")


def test_convert_passes_every_execute_argument(tmp_path: Path) -> None:
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(b"old")
    seen: list[tuple[int, int]] = []
    execute: dict[str, Any] = {"force": True, "select": "model_ema", "verify": True, "fsync": True}
    rep = vitresize.convert(_SRC, dst, img_size=48, progress=lambda *a: seen.append(a), **execute)
    assert rep.written_state_dicts == ("model_ema",) and "model" in rep.left_out
    assert rep.verified is not None and rep.verified.tensors == rep.passed_through > 0
    done = [d for d, _ in seen]
    assert done and done == sorted(done) and done[-1] == rep.bytes_written == dst.stat().st_size
    assert dst.read_bytes() != b"old" and leftovers(tmp_path) == []


@pytest.mark.parametrize(("field", "value"), [("allow_large", "no"), ("allow_large", 1), ("antialias", "yes")])
def test_options_bool_fields_are_bools(field: str, value: object) -> None:
    """A truthy string must not lift the budgets (or switch antialiasing) by accident."""
    with pytest.raises(UsageError, match=f"^{field} "):
        vitresize.Options(**{field: value})  # type: ignore[arg-type]


def test_error_repr_and_args_name_parameters() -> None:
    """repr() and args (what logging and pytest show) carry the API's text, no marker characters."""
    with pytest.raises(UsageError) as info:
        Target(img_size=384, grid=24)
    err = info.value
    assert "\ue000" not in repr(err) and "\ue000" not in str(err.args[0])
    assert "img_size" in repr(err) and "--img-size" in err.cli_message()
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.cli_message() == err.cli_message()
