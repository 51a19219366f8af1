"""Hostile safetensors headers: vitresize's reader agrees with the safetensors library on every file.

The oracle is the library itself: a file is valid when ``safe_open(path, "pt")`` opens it and every tensor reads.
``read_header`` must accept exactly those files, refusing the others with one-line ``CheckpointFormatError`` s,
and ``vitresize inspect`` must end in one ``Error:`` line, never a traceback. Two deliberate differences:
vitresize refuses F4 (packed 4-bit floats, two to a byte), which the library reads as ``float4_e2m1fn_x2``, and
headers over its budgets of JSON arrays and objects (``MAX_HEADER_CONTAINERS``) and of separators
(``MAX_HEADER_SEPARATORS``), which bound the memory and time of parsing a header of up to 100 MB.

Also: big-endian ``.npz`` arrays (NumPy writes what it is given) are read in native byte order.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import digest, fixture, load_any
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vitresize.cli import app
from vitresize.errors import CheckpointFormatError
from vitresize.formats import safetensors as st
from vitresize.formats._dtypes import ST_BITS
from vitresize.formats.safetensors import MAX_HEADER_CONTAINERS, MAX_HEADER_SEPARATORS, read_header

# --- building headers, duplicates and raw literals included --------------------------------------------


class Raw(str):
    """A JSON literal written as it is (``-0``, ``1e400``, ``NaN``, a string with a surrogate escape)."""


class Obj(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs: keys may repeat."""


def dumps(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, Obj):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(x)}" for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dumps(x) for x in v) + "]"
    return json.dumps(v)


def entry(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8), *extra: tuple[str, Any]) -> Obj:
    return Obj([("dtype", dtype), ("shape", list(shape)), ("data_offsets", list(offsets)), *extra])


def st_file(path: Path, header: Any, data: bytes = b"", n: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


def library_reads(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                f.get_tensor(k)
    except Exception:
        return False
    return True


def vitresize_refusal(path: Path) -> str | None:
    """``read_header``'s one-line refusal, or None when it reads the file. Anything but a
    CheckpointFormatError escapes (a bug)."""
    try:
        read_header(path)
    except CheckpointFormatError as e:
        assert "\n" not in str(e), str(e)
        return str(e)
    return None


def assert_agree(path: Path, what: str = "") -> None:
    lib, refusal = library_reads(path), vitresize_refusal(path)
    if lib and refusal is not None and "has dtype F4 " in refusal:
        return  # deliberate: vitresize does not read packed 4-bit floats
    if lib and refusal is not None and "deliberate budget" in refusal:
        return  # deliberate: headers over vitresize's budgets (see test_header_budgets_are_deliberate_refusals)
    assert (refusal is None) == lib, f"{what}: safetensors {'reads' if lib else 'refuses'} it, vitresize: {refusal}"


D8 = bytes(8)
T = "t"

# (id, header, data): each once disagreed with the library or gave a traceback, or pins a verdict that must stay.
CASES: list[tuple[str, Any, bytes]] = [
    ("valid", Obj([(T, entry())]), D8),
    ("shape-float", Obj([(T, entry(shape=[Raw("2.0")]))]), D8),
    ("shape-exp", Obj([(T, entry(shape=[Raw("2e0")]))]), D8),
    ("shape-str-item", Obj([(T, entry(shape=["2"]))]), D8),
    ("shape-str", Obj([(T, Obj([("dtype", "F32"), ("shape", "2"), ("data_offsets", [0, 8])]))]), D8),
    ("shape-bool", Obj([(T, entry(shape=[True, 2]))]), D8),
    ("shape-neg-zero", Obj([(T, entry("F32", [Raw("-0")], [0, 0]))]), b""),
    ("shape-2**64", Obj([(T, entry(shape=[2**64]))]), D8),
    ("shape-object", Obj([(T, Obj([("dtype", "F32"), ("shape", Obj()), ("data_offsets", [0, 4])]))]), bytes(4)),
    ("offsets-float", Obj([(T, entry(offsets=[Raw("0.0"), 8]))]), D8),
    ("offsets-str", Obj([(T, entry(offsets=["0", 8]))]), D8),
    ("offsets-bool", Obj([(T, entry(offsets=[False, 8]))]), D8),
    ("offsets-neg-zero", Obj([(T, entry(offsets=[Raw("-0"), 8]))]), D8),
    ("offsets-2**64", Obj([(T, entry(offsets=[0, 2**64]))]), D8),
    ("offsets-three", Obj([(T, entry(offsets=[0, 8, 8]))]), D8),
    ("dtype-list", Obj([(T, entry(dtype=["F32"]))]), D8),
    ("dtype-object", Obj([(T, entry(dtype=Obj([("a", 1)])))]), D8),
    ("dtype-enum-map", Obj([(T, entry(dtype=Obj([("F32", None)])))]), D8),  # serde reads {"F32": null}
    ("dtype-enum-map-value", Obj([(T, entry(dtype=Obj([("F32", Obj())])))]), D8),
    ("dtype-lowercase", Obj([(T, entry(dtype="f32"))]), D8),
    ("dtype-null", Obj([(T, entry(dtype=None))]), D8),
    ("entry-as-array", Obj([(T, ["F32", [2], [0, 8]])]), D8),  # serde reads a struct from its fields in order
    ("entry-as-long-array", Obj([(T, ["F32", [2], [0, 8], 1])]), D8),
    ("entry-null", Obj([(T, None)]), b""),
    ("extra-field", Obj([(T, entry("F32", [2], [0, 8], ("x", [1, Obj([("y", None)])])))]), D8),
    ("repeated-field", Obj([(T, entry("F32", [2], [0, 8], ("dtype", "F32")))]), D8),
    ("missing-field", Obj([(T, Obj([("dtype", "F32"), ("shape", [2])]))]), D8),
    ("nan", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw("NaN"))))]), D8),
    ("infinity", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw("-Infinity"))))]), D8),
    ("1e400", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw("1e400"))))]), D8),
    ("1e-400", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw("1e-400"))))]), D8),
    ("max-f64", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw("1.7976931348623157e308"))))]), D8),
    ("long-int-in-range", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw("1" * 309))))]), D8),
    ("long-int-out-of-range", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw("1" * 310))))]), D8),
    ("max-f64-as-int", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw("17976931348623157" + "0" * 292))))]), D8),
    ("exponent-overflow", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw("1e9999999999"))))]), D8),
    ("zero-exponent-overflow", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw("0e9999999999"))))]), D8),
    ("int-below-i64", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw("-9223372036854775809"))))]), D8),
    ("lone-surrogate", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw('"\\ud800"'))))]), D8),
    ("lone-trail-surrogate", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw('"\\udc00"'))))]), D8),
    ("surrogate-pair", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw('"\\ud83d\\ude00"'))))]), D8),
    ("escaped-backslash-u", Obj([(T, entry("F32", [2], [0, 8], ("x", Raw('"\\\\ud800"'))))]), D8),
    ("surrogate-in-name", Raw('{"t\\udfff":' + dumps(entry()) + "}"), D8),
    ("duplicate-tensor", Obj([(T, entry()), (T, entry())]), D8),
    ("duplicate-bad-then-good", Obj([(T, entry(dtype="Q4")), (T, entry())]), D8),
    ("duplicate-good-then-bad", Obj([(T, entry()), (T, entry(dtype="Q4"))]), D8),
    ("duplicate-last-counts", Obj([(T, entry("F32", [1], [0, 4])), (T, entry())]), D8),
    ("metadata-null", Obj([("__metadata__", None), (T, entry())]), D8),
    ("metadata-list", Obj([("__metadata__", []), (T, entry())]), D8),
    ("metadata-empty-string", Obj([("__metadata__", ""), (T, entry())]), D8),
    ("metadata-zero", Obj([("__metadata__", 0), (T, entry())]), D8),
    ("metadata-false", Obj([("__metadata__", False), (T, entry())]), D8),
    ("metadata-number-value", Obj([("__metadata__", Obj([("a", 1)])), (T, entry())]), D8),
    ("metadata-null-value", Obj([("__metadata__", Obj([("a", None)])), (T, entry())]), D8),
    ("metadata-repeated-key", Obj([("__metadata__", Obj([("a", "b"), ("a", "c")])), (T, entry())]), D8),
    ("metadata-twice", Obj([("__metadata__", Obj()), (T, entry()), ("__metadata__", Obj())]), D8),
    ("zero-size-inside-other", Obj([("a", entry("F32", [1], [0, 4])), ("z", entry("F32", [0], [2, 2]))]), bytes(4)),
    ("zero-size-at-end", Obj([("a", entry("F32", [1], [0, 4])), ("z", entry("F32", [0], [4, 4]))]), bytes(4)),
    ("zero-size-past-end", Obj([("a", entry("F32", [1], [0, 4])), ("z", entry("F32", [0], [8, 8]))]), bytes(4)),
    ("zero-size-alone-at-3", Obj([("z", entry("F32", [0], [3, 3]))]), bytes(3)),
    ("zero-then-overflow", Obj([("z", entry("F32", [0, 2**32, 2**32], [0, 0]))]), b""),
    ("overflow-then-zero", Obj([("z", entry("F32", [2**32, 2**32, 0], [0, 0]))]), b""),
    ("bytes-overflow", Obj([("z", entry("F32", [2**62], [0, 0]))]), b""),
    ("overlap", Obj([("a", entry("F32", [1], [0, 4])), ("b", entry("F32", [1], [2, 6]))]), bytes(6)),
    ("gap", Obj([("a", entry("F32", [1], [0, 4])), ("b", entry("F32", [1], [5, 9]))]), bytes(9)),
    ("out-of-order", Obj([("b", entry("F32", [1], [4, 8])), ("a", entry("F32", [1], [0, 4]))]), D8),
    ("reversed-offsets", Obj([(T, entry("F32", [0], [4, 0]))]), bytes(4)),
    ("data-byte-appended", Obj([(T, entry())]), D8 + b"\0"),
    ("data-cut-short", Obj([(T, entry())]), D8[:-1]),
    ("empty-header-object", Obj(), b""),
    ("empty-name", Obj([("", entry())]), D8),
    ("not-an-object", [], b""),
    ("F8", Obj([(c, entry(c, [8], [8 * i, 8 * i + 8])) for i, c in enumerate(["F8_E4M3", "F8_E5M2"])]), bytes(16)),
    ("F8_E8M0", Obj([(T, entry("F8_E8M0", [8], [0, 8]))]), D8),
    ("F8_E4M3FNUZ", Obj([(T, entry("F8_E4M3FNUZ", [8], [0, 8]))]), D8),
    ("F8_E5M2FNUZ", Obj([(T, entry("F8_E5M2FNUZ", [2, 4], [0, 8]))]), D8),
    ("C64", Obj([(T, entry("C64", [1], [0, 8]))]), D8),
    ("F6-whole-bytes", Obj([(T, entry("F6_E2M3", [4], [0, 3]))]), bytes(3)),  # valid, but torch has no F6
    ("F6-zero-size", Obj([(T, entry("F6_E3M2", [0], [0, 0]))]), b""),
    ("F4-half-byte", Obj([(T, entry("F4", [3], [0, 2]))]), bytes(2)),
    ("F4-odd-last-dim", Obj([(T, entry("F4", [2, 3], [0, 3]))]), bytes(3)),
    ("F4", Obj([(T, entry("F4", [8, 2], [0, 8]))]), D8),  # the library reads it; vitresize refuses F4
]


@pytest.mark.parametrize(("header", "data"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_verdict_agrees_with_safetensors(tmp_path: Path, header: Any, data: bytes) -> None:
    assert_agree(st_file(tmp_path / "x.safetensors", header, data))


VALID = dumps(Obj([(T, entry())])).encode()


@pytest.mark.parametrize(
    ("raw", "n_delta"),
    [
        (b" \n\t" + VALID, 0),  # leading whitespace: safetensors 0.8 does not insist on "{" first
        (VALID + b"  \t\r\n", 0),  # trailing whitespace (the writer's padding)
        (VALID + b"\0\0", 0),  # NUL padding
        (VALID + b"}", 0),
        (b"\xef\xbb\xbf" + VALID, 0),  # a byte order mark
        (VALID.decode().encode("utf-16-le"), 0),  # json.loads(bytes) would guess UTF-16
        (VALID.replace(b'"t"', b'"t\xff"'), 0),  # not UTF-8
        (VALID.replace(b'"t"', b'"t\xed\xa0\x80"'), 0),  # a surrogate encoded in UTF-8
        (VALID.replace(b'"t"', b'"t\x01"'), 0),  # a control character in a string
        (b"", 0),  # header length 0
        (VALID, 1),  # header length past the end of the file
        (VALID, -1),
    ],
    ids=["leading-ws", "trailing-ws", "nul-pad", "trailing-brace", "bom", "utf16", "not-utf8", "utf8-surrogate",
         "control-char", "empty", "length+1", "length-1"],
)  # fmt: skip
def test_header_bytes_agree_with_safetensors(tmp_path: Path, raw: bytes, n_delta: int) -> None:
    assert_agree(st_file(tmp_path / "x.safetensors", raw, D8, n=len(raw) + n_delta))


@pytest.mark.parametrize("n", [2**64 - 1, 2**63, 100_000_001])
def test_huge_header_length_is_refused(tmp_path: Path, n: int) -> None:
    assert_agree(st_file(tmp_path / "x.safetensors", VALID, D8, n=n))


def test_header_size_limit_is_the_librarys(tmp_path: Path) -> None:
    """safetensors refuses headers over 100_000_000 bytes (vitresize allowed 100 MiB)."""
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100_000_000) + b"{}")
        f.write(b" " * (100_000_000 - 2))
    assert library_reads(path) and vitresize_refusal(path) is None
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 100_000_001))
        f.seek(0, 2)
        f.write(b" ")
    assert_agree(path, "header of 100_000_001 bytes")
    assert not library_reads(path)


def _nested(depth: int, kind: str) -> str:
    """A JSON value ``depth`` levels deep."""
    return "[" * depth + "]" * depth if kind == "array" else '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("depth", [1, 100, 124, 125, 126, 127, 200, 998, 999, 1000, 5000])
def test_nesting_limit_is_serde_jsons(tmp_path: Path, depth: int, kind: str) -> None:
    """serde_json stops at 128 levels (the header object and the tensor entry are two of them); Python's json
    recursed into a RecursionError near 1000."""
    head = '{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + _nested(depth, kind) + "}}"
    assert_agree(st_file(tmp_path / "x.safetensors", head.encode(), D8), f"depth {depth + 2}")


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path: Path) -> None:
    path = st_file(tmp_path / "x.safetensors", ('{"t":' + "[" * 100_000 + "]" * 100_000 + "}").encode())
    assert not library_reads(path)
    refusal = vitresize_refusal(path)
    assert refusal is not None and "nests deeper than 127 levels" in refusal
    # Brackets inside strings do not count.
    value = dumps(entry("F32", [2], [0, 8], ("x", "[" * 500), ("y", '\\\\\\"' + "{" * 500)))
    quoted = '{"t":' + value + "}"
    path = st_file(tmp_path / "q.safetensors", quoted.encode(), D8)
    assert library_reads(path) and vitresize_refusal(path) is None


def _junk_header(junk: str) -> bytes:
    return ('{"pos_embed":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"junk":' + junk + "}}").encode()


def _counts(raw: bytes) -> tuple[int, int]:
    """What the budgets count: '[' and '{', ',' and ':'."""
    return raw.count(b"[") + raw.count(b"{"), raw.count(b",") + raw.count(b":")


def test_header_budgets_are_deliberate_refusals(tmp_path: Path) -> None:
    """A valid header of 20 MB of empty arrays in an ignored field took 12.6 s and 1 GiB to parse (at the 100 MB
    limit ~60 s and 5 GiB); the library reads it, vitresize refuses it unparsed, as it does any header over its
    budgets of '[' and '{' or of ',' and ':'."""
    frame_containers, frame_separators = _counts(_junk_header("0"))  # 4 and 9
    for name, junk, needle, counts in (
        ("20MB-of-[]", "[" + ",".join(["[]"] * 6_666_000) + "]", "'[' and '{'", None),
        (
            "containers+1",
            "[" + ",".join(["[]"] * (MAX_HEADER_CONTAINERS - frame_containers)) + "]",
            "'[' and '{'",
            (MAX_HEADER_CONTAINERS + 1, None),
        ),
        (
            "separators+1",
            "[" + ",".join(["0"] * (MAX_HEADER_SEPARATORS - frame_separators + 2)) + "]",
            "',' and ':'",
            (None, MAX_HEADER_SEPARATORS + 1),
        ),
        ("members", "{" + ",".join(['"":0'] * (MAX_HEADER_SEPARATORS // 2)) + "}", "',' and ':'", None),
    ):
        raw = _junk_header(junk)
        if counts is not None:
            assert all(want in (None, got) for want, got in zip(counts, _counts(raw), strict=True)), name
        path = st_file(tmp_path / f"{name}.safetensors", raw, D8)
        assert library_reads(path), name
        refusal = vitresize_refusal(path)
        assert refusal is not None and "deliberate budget" in refusal and needle in refusal, (name, refusal)
        res = CliRunner().invoke(app, ["inspect", str(path)])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 1 and len(lines) == 1 and "deliberate budget" in lines[0], res.stderr


@pytest.mark.parametrize("budget", ["containers", "separators"])
def test_header_budgets_are_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: str) -> None:
    """At the budget a header reads; one more '[' or ',' (inside a string too: the count is an upper bound) and it
    is refused. Budgets made small here, so as to be quick."""
    monkeypatch.setattr(st, f"MAX_HEADER_{budget.upper()}", 1000)
    which = 0 if budget == "containers" else 1
    frame = _counts(_junk_header("[]"))[which]
    items = ["[]"] * (1000 - frame) if budget == "containers" else ["0"] * (1000 - frame + 1)
    raw = _junk_header("[" + ",".join(items) + "]")
    assert _counts(raw)[which] == 1000
    assert vitresize_refusal(st_file(tmp_path / "at.safetensors", raw, D8)) is None
    more = raw.replace(b'"F32"', b'"F32","name":"[,"')
    refusal = vitresize_refusal(st_file(tmp_path / "over.safetensors", more, D8))
    assert refusal is not None and "deliberate budget of 1000" in refusal, refusal


# --- a seeded random set of header mutations ------------------------------------------------------------

_CODES = sorted(ST_BITS)
_WEIRD_DTYPES: list[Any] = [
    "f32", "Q4", "", 7, None, True, ["F32"], Obj(), Obj([("F32", None)]), Obj([("F16", Obj())]),
    Obj([("F32", None), ("F16", None)]), Obj([("Q4", None)]),
]  # fmt: skip
_WEIRD_NUMBERS: list[Any] = [
    -1, 2**64, 2**64 - 1, 2**63, 2**32, 1.5, True, False, None, "8", Raw("-0"), Raw("8.0"), Raw("8e0"), Raw("1E1"),
]  # fmt: skip
_WEIRD_VALUES: list[Any] = [
    1, -1, 1.5, "x", None, [], Obj(), [1, [2, Obj([("y", None)])]], Raw("-0"), Raw("1e400"), Raw("-1e400"),
    Raw("1e-400"), Raw("1.7976931348623157e308"), Raw("1.7976931348623159e308"), Raw("9" * 309), Raw("1" * 310),
    Raw("18446744073709551616"), Raw("-9223372036854775809"), Raw("NaN"), Raw("Infinity"), Raw('"\\ud800"'),
    Raw('"\\udbff\\udfff"'), Raw('"\\\\udc00"'), Raw('"a\\u0000"'), Obj([("k", 1), ("k", 2)]),
]  # fmt: skip
_METADATA: list[Any] = [
    None, Obj(), Obj([("format", "pt")]), [], "", 0, False, "x", Obj([("a", 1)]), Obj([("a", None)]),
    Obj([("a", "b"), ("a", "c")]), [["a", "b"]], Obj([("a", ["b"])]), Obj([("a", Raw('"\\ud800"'))]),
]  # fmt: skip


def _tensor(rng: random.Random) -> tuple[str, list[int], int]:
    code = rng.choice(_CODES)
    shape = [rng.choice([0, 1, 1, 2, 3, 4, 8]) for _ in range(rng.randrange(4))]
    numel = int(np.prod(shape)) if shape else 1
    if code in ("F4", "F6_E2M3", "F6_E3M2") and rng.random() < 0.7:
        shape, numel = [*shape, 4], numel * 4  # whole bytes, mostly
    return code, shape, numel * ST_BITS[code] // 8


def random_case(rng: random.Random) -> tuple[bytes, str]:
    """A safetensors file: a valid layout of a few tensors, then 0-3 mutations; and what was done."""
    tensors = [(f"t{i}", *_tensor(rng)) for i in range(rng.randrange(1, 5))]
    rng.shuffle(tensors)  # the data order need not be the header's
    header, at = Obj(), 0
    for name, code, shape, size in tensors:
        header.append((name, entry(code, shape, [at, at + size])))
        at += size
    rng.shuffle(header)
    data = bytes(rng.randrange(256) for _ in range(at))
    done = []
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
        if not header:
            break
        i = rng.randrange(len(header))
        name, e = header[i]
        fields = dict(e) if isinstance(e, Obj) else {}
        what = rng.randrange(14)
        done.append(f"{what}:{name}")
        if what == 0:
            fields["dtype"] = rng.choice(_CODES + _WEIRD_DTYPES)
        elif what == 1:
            fields["shape"] = rng.choice(
                [[rng.choice(_WEIRD_NUMBERS)], [2, rng.choice(_WEIRD_NUMBERS)], "2", [], Obj()]
            )
        elif what == 2 and isinstance(fields.get("shape"), list):
            fields["shape"] = [max(0, d + rng.choice([-1, 1])) if isinstance(d, int) else d for d in fields["shape"]]
        elif what == 3:
            offsets = fields.get("data_offsets")
            a, b = offsets if isinstance(offsets, list) and [type(o) for o in offsets] == [int, int] else (0, 0)
            fields["data_offsets"] = rng.choice(
                [
                    [rng.choice(_WEIRD_NUMBERS), b],
                    [a, rng.choice(_WEIRD_NUMBERS)],
                    [b, a],
                    [a],
                    [a, b, b],
                    [a + 1, b + 1],
                ]
            )
        elif what == 4:
            extra = rng.choice([*_WEIRD_VALUES, "deep"])
            if extra == "deep":
                extra = Raw(_nested(rng.choice([1, 124, 125, 126, 127, 300]), rng.choice(["array", "object"])))
            header[i] = (name, Obj([*e, ("x", extra)]) if isinstance(e, Obj) else e)
            continue
        elif what == 5:
            again = rng.choice(["dtype", "shape", "data_offsets"])
            header[i] = (name, Obj([*e, (again, fields[again])]) if again in fields else e)
            continue
        elif what == 6:
            header[i] = (name, [fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")])
            continue
        elif what == 7:
            header[i] = (name, rng.choice([None, 1, "x", [], Obj(), Obj([("dtype", "F32"), ("shape", [])])]))
            continue
        elif what == 8:
            del header[i]
            continue
        elif what == 9:
            header.insert(rng.randrange(len(header) + 1), (name, rng.choice([e, entry(), entry(dtype="Q4")])))
            continue
        elif what == 10:
            for _ in range(rng.choice([1, 1, 2])):
                header.insert(rng.randrange(len(header) + 1), ("__metadata__", rng.choice(_METADATA)))
            continue
        elif what == 11:
            spot = rng.choice([0, at, rng.randrange(at + 1), at + 4])
            header.insert(rng.randrange(len(header) + 1), ("z", entry(rng.choice(_CODES), [0], [spot, spot])))
            continue
        elif what == 12:
            data = rng.choice([data + b"\0", data[:-1], data + bytes(8)])
            continue
        else:
            fields["dtype"] = Obj([(str(fields.get("dtype")), None)])
        header[i] = (name, Obj(list(fields.items())))
    raw = dumps(header).encode()
    pad = rng.choice([b"", b"", b" " * (-len(raw) % 8), b"\n", b"\0", b"\t "])
    return struct.pack("<Q", len(raw + pad)) + raw + pad + data, " ".join(done)


def test_random_headers_agree_with_safetensors(tmp_path: Path) -> None:
    rng = random.Random(20261122)
    path = tmp_path / "x.safetensors"
    verdicts = {True: 0, False: 0}
    for case in range(400):
        raw, what = random_case(rng)
        path.write_bytes(raw)
        assert_agree(path, f"case {case} ({what}): {raw[8:300]!r}")
        verdicts[library_reads(path)] += 1
    assert min(verdicts.values()) > 80, verdicts  # both verdicts well exercised


# --- the command line: one Error: line, never a traceback ------------------------------------------------

HOSTILE = [c for c in CASES if c[0] in {
    "shape-float", "shape-str-item", "offsets-float", "offsets-neg-zero", "dtype-list", "dtype-object",
    "dtype-enum-map-value", "repeated-field", "nan", "1e400", "lone-surrogate", "duplicate-bad-then-good",
    "metadata-list", "metadata-twice", "zero-size-inside-other", "overflow-then-zero", "F6-whole-bytes", "F4",
}] + [
    ("deep", Raw('{"t":' + "[" * 100_000 + "]" * 100_000 + "}"), b""),
    ("deep-150", Raw('{"t":' + "[" * 150 + "]" * 150 + "}"), b""),
]  # fmt: skip


@pytest.mark.parametrize(("header", "data"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_inspect_hostile_header_is_one_error_line(tmp_path: Path, header: Any, data: bytes) -> None:
    path = st_file(tmp_path / "x.safetensors", header, data)
    res = CliRunner().invoke(app, ["inspect", str(path)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr


def test_F4_is_refused_by_name(tmp_path: Path) -> None:
    path = st_file(tmp_path / "x.safetensors", Obj([("pos_embed", entry("F4", [8, 2], [0, 8]))]), D8)
    assert library_reads(path)
    res = CliRunner().invoke(app, ["inspect", str(path)])
    assert res.exit_code == 1 and "'pos_embed' has dtype F4" in res.stderr, res.stderr


@pytest.mark.parametrize(
    "dtype", ["float8_e5m2", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"]
)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_float8_and_empty_tensors_pass_through(tmp_path: Path, dtype: str, suffix: str) -> None:
    """Tensors vitresize does not change keep their dtype and bytes, whatever safetensors dtype they have."""
    sd = load_file(str(fixture("timm_vit_cls.safetensors")))
    d = getattr(torch, dtype)
    sd = {k: v.to(d) if k.startswith("blocks.") else v for k, v in sd.items()}
    sd |= {"extra.empty": torch.zeros(0, 4, dtype=d), "extra.empty_f32": torch.zeros(3, 0)}
    src = tmp_path / "src.safetensors"
    save_file(sd, str(src))
    inspect = CliRunner().invoke(app, ["inspect", str(src)])
    assert inspect.exit_code == 0, inspect.stderr
    dst = tmp_path / f"out{suffix}"
    res = CliRunner().invoke(app, ["convert", str(src), str(dst), "--img-size", "48"])
    assert res.exit_code == 0, res.stderr
    out = load_any(dst)
    assert set(out) == set(sd)
    for k, v in sd.items():
        if k != "pos_embed":
            assert digest(out[k]) == digest(v), k
    assert out["pos_embed"].shape == (1, 37, 16)


def test_float8_e8m0_without_torch_support_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitresize.formats.safetensors import SafetensorsCheckpoint

    path = st_file(tmp_path / "x.safetensors", Obj([(T, entry("F8_E8M0", [8], [0, 8]))]), D8)
    ckpt = SafetensorsCheckpoint(path)
    monkeypatch.delattr(torch, "float8_e8m0fnu")  # torch < 2.7
    with pytest.raises(CheckpointFormatError, match=r"'t' is F8_E8M0, which torch .* cannot hold; upgrade torch"):
        ckpt.tensor("", T)


# --- big-endian .npz ---------------------------------------------------------------------------------------


def _vit_npz(path: Path, order: str) -> dict[str, np.ndarray[Any, Any]]:
    """The vit_jax layout of tests/fuzzing.py (32 px, patch 8: pos table [1, 17, 16]), in byte order ``order``."""
    rng = np.random.default_rng(0)
    arrays = {
        "Transformer/posembed_input/pos_embedding": rng.standard_normal((1, 17, 16), dtype=np.float32),
        "embedding/kernel": rng.standard_normal((8, 8, 3, 16), dtype=np.float32),
        "embedding/bias": rng.standard_normal(16, dtype=np.float32),
        "cls": rng.standard_normal((1, 1, 16)),
        "head/kernel": rng.integers(-(2**40), 2**40, (16, 10)),
    }
    arrays = {k: v.astype(v.dtype.newbyteorder(order)) for k, v in arrays.items()}
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return arrays


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".npz"])
@pytest.mark.parametrize("target", [["--img-size", "48"], ["--patch", "4"]], ids=["img-size", "patch"])
def test_big_endian_npz_converts_to_the_right_values(tmp_path: Path, suffix: str, target: list[str]) -> None:
    big = _vit_npz(tmp_path / "src_big.npz", ">")
    _vit_npz(tmp_path / "src_little.npz", "<")
    for name in ("big", "little"):
        res = CliRunner().invoke(
            app, ["convert", str(tmp_path / f"src_{name}.npz"), str(tmp_path / f"{name}{suffix}"), *target]
        )
        assert res.exit_code == 0, (res.exception, res.stderr)
    if suffix == ".npz":  # unchanged members keep their bytes (big-endian); changed ones equal the little run's
        with np.load(tmp_path / "big.npz") as out, np.load(tmp_path / "little.npz") as ref:
            for k, arr in big.items():
                if out[k].shape == arr.shape:
                    assert out[k].dtype == arr.dtype and out[k].tobytes() == arr.tobytes(), k
                else:
                    assert np.array_equal(out[k], ref[k]), k
        return
    out, ref = load_any(tmp_path / f"big{suffix}"), load_any(tmp_path / f"little{suffix}")
    assert set(out) == set(big)
    for k, arr in big.items():
        assert torch.equal(out[k], ref[k]), k  # resampled ones too: as from the little-endian file
        if out[k].shape == arr.shape:
            assert torch.equal(out[k], torch.from_numpy(arr.astype(arr.dtype.newbyteorder("=")))), k
