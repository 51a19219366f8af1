"""Mutation fuzzing of vitresize's readers and writers, on the committed fixtures.

Each case takes a fixture (safetensors, torch zip, legacy torch pickle, a malicious pickle, or a NumPy
.npz), mutates it (bit flips, truncation, overwritten ranges, appended junk, safetensors header edits,
shuffled, dropped or lying zip members), and runs ``vitresize inspect`` and ``vitresize convert --verify``
on it in a fresh folder. The property checked for every case:

* exit 0 with a written output that re-reads, or exit 1/2 with exactly one ``Error:`` line on stderr
  and no output file;
* never a traceback, a crash, a hang (a time limit per case), a temp file left behind, a change to the
  input, or the malicious payload's marker file.

``make test`` runs 150 seeded cases and ``make test-slow`` 600 (``tests/test_fuzz.py``); ``make fuzz N=5000`` runs this
file as a script, in worker processes that a watchdog kills on a hang::

    python tests/fuzzing.py --cases 5000 [--seed 0] [--workers 2] [--timeout 60]
    python tests/fuzzing.py --seed 0 --case 1234 --keep /tmp/case   # replay one case
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import queue
import random
import re
import shutil
import stat
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
MARKER = "vitresize-pwned"  # what fixtures/malicious*.pth would create if their payload ran

BASES = [
    "timm_vit_cls.safetensors",
    "timm_vit_reg4.safetensors",
    "timm_vit_bf16.safetensors",
    "timm_vit_cls.pth",
    "deit_distilled.pth",
    "torchvision_vit.pth",
    "timm_vit_fp16.pth",
    "timm_vit_legacy.pth",
    "malicious.pth",
    "malicious_legacy.pth",
    "vit.npz",  # made in memory (vit_jax layout)
    "families/big_vision.npz",
    "families/open_clip.pth",
    "families/dinov2_vits14_reg4.pth",
    "families/hf_clip/model.safetensors",
    "families/hf_vit/",  # model folders: mutated as folders (links, FIFOs, sockets, JSON), see mutate_folder
    "families/hf_vit_sharded/",
    "families/hf_clip/",
]


def _npz_bytes() -> bytes:
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {
        "Transformer/posembed_input/pos_embedding": rng.standard_normal((1, 17, 16), dtype=np.float32),
        "embedding/kernel": rng.standard_normal((8, 8, 3, 16), dtype=np.float32),
        "cls": np.zeros((1, 1, 16), np.float32),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def base_bytes(name: str) -> bytes:
    return _npz_bytes() if name == "vit.npz" else (FIXTURES / name).read_bytes()


# --- mutations: each takes (data, rng) and returns the mutated bytes and a short description ----------

Mutation = Callable[[bytes, random.Random], tuple[bytes, str]]


def flip_bits(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    n = rng.choice([1, 1, 2, 8, 64])
    for _ in range(n):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b), f"flip {n} bit(s)"


def flip_bits_in_head(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Flip bits where the structure lives (headers, pickles at the start of the file)."""
    b = bytearray(data)
    end = min(len(b), 4096)
    for _ in range(rng.choice([1, 2, 4])):
        i = rng.randrange(end)
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b), "flip bit(s) in the first 4 kB"


def truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.choice([0, 1, 7, 8, 9, rng.randrange(len(data)), len(data) - 1, len(data) - rng.randrange(1, 64)])
    cut = max(0, min(cut, len(data) - 1))
    return data[:cut], f"truncate at {cut}"


def overwrite(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    start = rng.randrange(len(b))
    length = min(rng.choice([1, 4, 16, 256, 4096]), len(b) - start)
    fill = rng.choice([b"\x00", b"\xff", None])
    b[start : start + length] = fill * length if fill else rng.randbytes(length)
    return bytes(b), f"overwrite {length} bytes at {start}"


def append_junk(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    return data + rng.randbytes(rng.choice([1, 100, 5000])), "append junk"


def _split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes] | None:
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        return None
    return (header, data[8 + n :]) if isinstance(header, dict) else None


def _join_safetensors(header: Any, body: bytes, pad: bool = True) -> bytes:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


_WEIRD = [None, -1, 0, 1, 2**31, 2**63, 2**70, 1.5, "x", [], {}, [1], True, [-1, 4]]


def edit_safetensors_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    try:
        return _edit_safetensors_header(data, rng)
    except (TypeError, ValueError, KeyError):  # an earlier mutation left an entry this edit cannot take
        return flip_bits(data, rng)


def _edit_safetensors_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    split = _split_safetensors(data)
    if split is None:
        return flip_bits(data, rng)
    header, body = split
    names = [k for k in header if k != "__metadata__" and isinstance(header[k], dict)]
    if not names:  # an earlier mutation left no entry to edit
        return flip_bits(data, rng)
    key = rng.choice(names)
    entry = header[key]
    what = rng.randrange(12)
    if what == 0:
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "Q4", 7, None])
    elif what == 1:
        entry["shape"] = rng.choice([[], [0], [1, 17], [1, 1, 1, 1, 17, 16], [2**40, 2**40], [-1], "17", [1.5]])
    elif what == 2:
        entry["shape"] = [max(0, int(s) + rng.choice([-1, 1, 16])) for s in entry["shape"]]
    elif what == 3:
        entry["data_offsets"] = [rng.choice(_WEIRD), rng.choice(_WEIRD)]
    elif what == 4:
        a, b = entry["data_offsets"]
        shift = rng.choice([-8, -4, 4, 8, len(body)])
        entry["data_offsets"] = [a + shift, b + shift]
    elif what == 5:
        entry["data_offsets"] = entry["data_offsets"][:1]
    elif what == 6:
        del header[key]
    elif what == 7:
        header[key + rng.choice(["_x", ".0", ""])] = dict(entry)
        header[rng.choice(["pos_embed", "patch_embed.proj.weight", "cls_token"])] = dict(entry)
    elif what == 8:
        header["__metadata__"] = rng.choice([{"a": 1}, ["x"], "x", None, {"vitresize.new_grid": "999999x999999"}])
    elif what == 9:
        header[key] = rng.choice(_WEIRD)
    elif what == 10:
        return _join_safetensors(header, body, pad=False)[:8] + data[8:], "header length off by padding"
    else:
        n = rng.choice([0, 2**64 - 1, 2**40, len(data), 8])
        return struct.pack("<Q", n) + data[8:], f"declared header length {n}"
    return _join_safetensors(header, body), f"header edit {what} on {key!r}"


def _members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return [(i, z.read(i)) for i in z.infolist()]
    except Exception:
        return None


def _rezip(members: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        warnings.simplefilter("ignore")  # "Duplicate name", when a mutation made one on purpose
        for info, content in members:
            z.writestr(info, content)
    return buf.getvalue()


def edit_zip(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    members = _members(data)
    if not members:
        return flip_bits(data, rng)
    what = rng.randrange(6)
    if what == 0:
        rng.shuffle(members)
        return _rezip(members), "shuffle zip members"
    if what == 1:
        i = rng.randrange(len(members))
        name = members.pop(i)[0].filename
        return _rezip(members), f"drop zip member {name}"
    if what == 2:
        i = rng.randrange(len(members))
        info, content = members[i]
        members[i] = (info, content[: rng.randrange(len(content) + 1)] + rng.randbytes(rng.choice([0, 3])))
        return _rezip(members), f"resize zip member {info.filename}"
    if what == 3:  # a member that lies about its size: patch the central directory
        b = bytearray(data)
        cd = b.rfind(b"PK\x01\x02")
        if cd < 0:
            return flip_bits(data, rng)
        field = rng.choice([20, 24])  # compressed / uncompressed size
        b[cd + field : cd + field + 4] = struct.pack("<I", rng.choice([0xFFFFFFFF, 2**31, 0]))
        return bytes(b), "zip member with a huge declared size"
    if what == 4:
        i = rng.randrange(len(members))
        info, content = members[i]
        members.append((zipfile.ZipInfo(info.filename), content))
        return _rezip(members), f"duplicate zip member {info.filename}"
    i = rng.randrange(len(members))
    info, content = members[i]
    if content:
        c = bytearray(content)
        c[rng.randrange(len(c))] ^= 0xFF
        members[i] = (info, bytes(c))
    return _rezip(members), f"corrupt zip member {info.filename}"


def _is_safetensors(name: str) -> bool:
    return name.endswith(".safetensors")


def _is_zip(name: str) -> bool:
    return name.endswith(".npz") or (name.endswith(".pth") and "legacy" not in name)


def mutate(name: str, data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutation (sometimes two) suited to the base file's format."""
    pool: list[Mutation] = [flip_bits, flip_bits_in_head, truncate, overwrite, append_junk]
    if _is_safetensors(name):
        pool += [edit_safetensors_header] * 4
    if _is_zip(name):
        pool += [edit_zip] * 4
    out, what = rng.choice(pool)(data, rng)
    if rng.random() < 0.15 and out:
        out, more = rng.choice(pool)(out, rng)
        what += " + " + more
    if rng.random() < 0.05:
        return b"", "empty file"
    return out, what


# --- folder mutations: model folders come from the internet (links, devices, FIFOs, sockets, JSON) ------

SECRET = b"vitresize-fuzz-SECRET-7f3a9c"  # planted outside the input: no output may ever hold it


def plant_secrets(workdir: Path) -> list[Path]:
    """A secret file and folder beside the input (mode 0600), for links that leave the folder to point at."""
    secret = workdir / "secret.txt"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    folder = workdir / "secretdir"
    folder.mkdir()
    (folder / "id_rsa").write_bytes(SECRET)
    (folder / "id_rsa").chmod(0o600)
    return [secret, folder]


def _pick_name(folder: Path, rng: random.Random) -> Path:
    """An existing file of the folder (to replace), or a new name, maybe in a subfolder."""
    existing = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    new = [folder / n for n in ("README.md", "tokenizer.json", ".gitattributes", "sub/notes.txt", "sub/deep/x.bin")]
    path = rng.choice(existing + new)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    return path


def folder_link_out(folder: Path, workdir: Path, rng: random.Random) -> str:
    path = _pick_name(folder, rng)
    target = rng.choice(
        [
            str(workdir / "secret.txt"),
            os.path.relpath(workdir / "secret.txt", path.parent),
            str(workdir / "secretdir"),
            "/dev/zero",
            "/dev/urandom",
            "/dev/null",
            "/etc/hostname",
            str(workdir / "nowhere" / "x"),  # dangling
            path.name,  # a link to itself (ELOOP)
        ]
    )
    path.symlink_to(target)
    return f"link {path.relative_to(folder)} -> {target}"


def folder_link_in(folder: Path, workdir: Path, rng: random.Random) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    target = rng.choice(files)
    path = folder / rng.choice(["copy.json", "sub/model.safetensors", "alias.bin"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(os.path.relpath(target, path.parent))
    return f"link {path.relative_to(folder)} -> {target.name} (inside)"


def folder_special(folder: Path, workdir: Path, rng: random.Random) -> str:
    path = _pick_name(folder, rng)
    if rng.random() < 0.6:
        os.mkfifo(path)
        return f"FIFO {path.relative_to(folder)}"
    import socket

    if len(str(path)) > 100:  # AF_UNIX paths are short
        os.mkfifo(path)
        return f"FIFO {path.relative_to(folder)}"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return f"socket {path.relative_to(folder)}"


def _json_target(folder: Path, rng: random.Random) -> Path:
    """A JSON file of the folder to rewrite; an earlier mutation's link, FIFO or socket there is removed first."""
    index = sorted(folder.glob("*.index.json"))
    path = rng.choice([folder / "config.json", *index, folder / "preprocessor_config.json"])
    if path.is_symlink() or (path.exists() and not stat.S_ISREG(path.lstat().st_mode)):
        path.unlink()
    return path


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # an earlier mutation may have made it 100k deep
        return {}


def folder_json_depth(folder: Path, workdir: Path, rng: random.Random) -> str:
    path = _json_target(folder, rng)
    depth = rng.choice([64, 127, 128, 129, 200, 1000, 100_000])
    opener, closer = rng.choice([('{"a":', "}"), ("[", "]")])
    deep = opener * depth + "1" + closer * depth
    data = _load_json(path)
    if isinstance(data, dict) and data and rng.random() < 0.7:
        field = rng.choice([*data, "deep"])
        raw = json.dumps({**data, field: "@@"}).replace('"@@"', deep)
    else:
        raw = deep
    path.write_text(raw)
    return f"JSON nested {depth} deep in {path.name}"


def folder_json_fields(folder: Path, workdir: Path, rng: random.Random) -> str:
    path = _json_target(folder, rng)
    data = _load_json(path)
    if not isinstance(data, dict):
        data = {}
    if rng.random() < 0.3:  # a timm hub config instead
        data = {"architecture": "vit_tiny_patch16_224", "pretrained_cfg": {"input_size": [3, 32, 32]}, "model_args": {}}
    field = rng.choice(
        [
            "image_size",
            "patch_size",
            "vision_config",
            "pretrained_cfg",
            "model_args",
            "metadata",
            "weight_map",
            "model_type",
            "architecture",
        ]
    )
    value = rng.choice(
        [
            *_WEIRD,
            [3, "x", 32],
            {"input_size": "x"},
            {"img_size": [1.5, 2]},
            {"total_size": "x"},
            {"pos_embed": "../secret.txt"},
            {"embeddings.position_embeddings": "/etc/hostname"},
            10**4000,
        ]
    )
    data[field] = value
    path.write_text(json.dumps(data) if not isinstance(value, int) or value < 10**100 else "{}")
    return f"{path.name}: {field} = {str(value)[:40]}"


def folder_json_big(folder: Path, workdir: Path, rng: random.Random) -> str:
    path = _json_target(folder, rng)
    pad = rng.choice([1, 17]) * 1024 * 1024
    path.write_bytes(b" " * pad + (path.read_bytes() if path.is_file() else b"{}"))
    return f"{path.name} padded to {pad // 1024 // 1024} MiB"


def folder_bytes(folder: Path, workdir: Path, rng: random.Random) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    path = rng.choice(files)
    data, what = mutate(path.name, path.read_bytes(), rng)
    path.write_bytes(data)
    return f"{path.name}: {what}"


def folder_perms(folder: Path, workdir: Path, rng: random.Random) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    path = rng.choice([*files, folder])
    mode = rng.choice([0o600, 0o640, 0o400, 0o700, 0o755]) if path != folder else rng.choice([0o700, 0o750])
    path.chmod(mode)
    return f"chmod {oct(mode)} {path.name}"


FOLDER_MUTATIONS: list[tuple[Callable[[Path, Path, random.Random], str], int]] = [
    (folder_link_out, 4),
    (folder_link_in, 1),
    (folder_special, 2),
    (folder_json_depth, 2),
    (folder_json_fields, 3),
    (folder_json_big, 1),
    (folder_bytes, 3),
    (folder_perms, 2),
]


def mutate_folder(folder: Path, workdir: Path, rng: random.Random) -> str:
    """One or two folder mutations; the description says what was done."""
    ops, weights = zip(*FOLDER_MUTATIONS, strict=True)
    done = [rng.choices(ops, weights)[0](folder, workdir, rng)]
    if rng.random() < 0.25:
        done.append(rng.choices(ops, weights)[0](folder, workdir, rng))
    return " + ".join(done)


def mutate_destination(src: Path, dst: Path, workdir: Path, rng: random.Random) -> tuple[Path, str, list[str]]:
    """Sometimes a hostile or careless DST: an ancestor of SRC, inside SRC, a link to a folder, a dangling link."""
    if rng.random() > 0.25:
        return dst, "", []
    what = rng.choice(["ancestor", "inside", "link to folder", "dangling link", "file as folder"])
    force = ["--force"] if rng.random() < 0.8 else []
    if what == "ancestor":
        return workdir, "DST = the folder holding SRC", force
    if what == "inside" and src.is_dir():
        return src / "resized", "DST inside SRC", force
    if what == "link to folder":
        other = workdir / "other"
        other.mkdir(exist_ok=True)
        (other / "keep.txt").write_text("keep me")
        link = workdir / "out_link"
        link.symlink_to("other")
        return link, "DST a link to a folder", force
    if what == "dangling link":
        link = workdir / "dangling"
        link.symlink_to(workdir / "nowhere" / dst.name)
        return link, "DST a dangling link", force
    return src / "x.safetensors", "DST below SRC", force


def tree_digest(path: Path) -> str:
    """What a file or folder holds, without following links or opening anything but regular files."""
    h = hashlib.sha256()
    if not os.path.lexists(path):
        return "absent"
    for root, dirs, files in os.walk(path) if path.is_dir() and not path.is_symlink() else [(None, [], [path])]:
        dirs.sort()
        for name in sorted(files) + dirs:
            p = Path(root, name) if root is not None else Path(name)
            st = os.lstat(p)
            h.update(f"{p}:{st.st_mode:o}:".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(str(p.readlink()).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(p.read_bytes())
    return h.hexdigest()


def leftovers_in(workdir: Path) -> list[str]:
    """Temp and backup files anywhere below ``workdir`` (links not followed)."""
    found = []
    for root, dirs, files in os.walk(workdir):
        found += [str(Path(root, n)) for n in dirs + files if ".vitresize-" in n]
    return sorted(found)


def check_folder_output(src: Path, dst: Path) -> list[str]:
    """A converted folder: regular files only, no secret inside, no mode wider than the source's, loadable."""
    problems = []
    if dst.is_symlink() or not dst.is_dir():
        return [f"output {dst} is not a folder"]
    for root, dirs, files in os.walk(dst):
        for name in files + dirs:
            p = Path(root, name)
            st = os.lstat(p)
            rel = p.relative_to(dst)
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"output holds {rel}, not a regular file (mode {st.st_mode:o})")
                continue
            data = p.read_bytes()
            if SECRET in data:
                problems.append(f"output {rel} holds a copy of a file outside the input (A LEAK)")
            s = src / rel
            if s.is_file():
                src_mode = s.stat().st_mode & 0o777
                if st.st_mode & 0o777 & ~src_mode:
                    mode = st.st_mode & 0o777
                    problems.append(f"output {rel} has mode {mode:o}, wider than the source's {src_mode:o}")
            copied = s.is_file() and s.read_bytes() == data
            if name.endswith(".safetensors") and not copied and (err := _reread(p)):
                problems.append(f"output {rel} does not load: {err}")
    return problems


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss() -> int:
    """Peak resident memory (bytes) since the last reset (VmHWM), or 0 where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


MAX_PEAK_RSS = 2 * 1024**3


# --- one case ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    case: int
    base: str
    mutation: str
    kind: str  # "converted" | "refused" | "FAIL"
    detail: str
    peak: int = 0  # peak resident memory of the process during the case, bytes (0: not measured)

    @property
    def failed(self) -> bool:
        return self.kind == "FAIL"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_ARGS = [
    ["--img-size", "48"],
    ["--img-size", "16"],
    ["--patch", "4"],
    ["--img-size", "48x64", "--patch", "4"],
    ["--grid", "3x5"],
]


def _check_refusal(res: Any, what: str) -> str | None:
    lines = res.stderr.strip().splitlines()
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        tb = "".join(traceback.format_exception(res.exception))
        return f"{what}: exception escaped:\n{tb}"
    if "Traceback" in res.stderr or "Traceback" in res.stdout:
        return f"{what}: traceback printed"
    if len(lines) != 1 or not lines[0].startswith("Error: "):
        return f"{what}: expected one Error: line, got {lines!r}"
    return None


def _reread(dst: Path) -> str | None:
    """Load the output with the libraries' own readers (not vitresize's); an error message, or None."""
    import torch

    try:
        if dst.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(dst))
        elif dst.suffix == ".npz":
            import numpy as np

            with np.load(dst, allow_pickle=False) as z:
                for k in z.files:
                    z[k]
        else:
            with torch.serialization.safe_globals(vitresize_safe_globals()):
                torch.load(dst, weights_only=True, mmap=True)
    except Exception as e:
        return repr(e)
    return None


def vitresize_safe_globals() -> list[Any]:
    from vitresize.formats.torch_pickle import _safe_globals

    return _safe_globals()


def run_case(seed: int, case: int, workdir: Path) -> Outcome:
    """Mutate, run inspect and convert in ``workdir`` (emptied first), check the property."""
    from typer.testing import CliRunner

    from vitresize.cli import app

    rng = random.Random(f"{seed}:{case}")
    base = rng.choice(BASES)
    if workdir.exists() or workdir.is_symlink():
        _clear(workdir)
    workdir.mkdir(parents=True)
    expected = set(plant_secrets(workdir))
    if base.endswith("/"):
        src = workdir / "input"
        shutil.copytree(FIXTURES / base, src)
        what = mutate_folder(src, workdir, rng)
        dst = workdir / "output"
    else:
        data, what = mutate(base, base_bytes(base), rng)
        ext = rng.choice([Path(base).suffix] * 4 + [".pth", ".safetensors", ".bin", ".npz"])
        src = workdir / f"input{ext}"
        src.write_bytes(data)
        outs = [".safetensors", ".pth"] + ([".npz"] if base.endswith(".npz") else [])
        dst = workdir / f"output{rng.choice(outs)}"
    args = rng.choice(_ARGS)
    dst, dst_what, extra = mutate_destination(src, dst, workdir, rng)
    if dst_what:
        what += f"; {dst_what} {' '.join(extra)}"
    expected |= {src, dst, workdir / "other"}
    before, dst_before = tree_digest(src), tree_digest(dst)
    runner = CliRunner()
    cwd = Path.cwd()
    os.chdir(workdir)
    measured = _reset_peak_rss()
    try:
        ins = runner.invoke(app, ["inspect", str(src), "--json"])
        res = runner.invoke(app, ["convert", str(src), str(dst), *args, *extra, "--verify", "--json"])
    finally:
        os.chdir(cwd)
    peak = _peak_rss() if measured else 0

    def out(kind: str, detail: str = "") -> Outcome:
        return Outcome(case, base, what, kind, detail, peak)

    problems = []
    if peak > MAX_PEAK_RSS:
        problems.append(f"peak memory {peak / 1024**3:.1f} GiB (limit {MAX_PEAK_RSS / 1024**3:.0f} GiB)")
    if ins.exit_code != 0 and (p := _check_refusal(ins, "inspect")):
        problems.append(p)
    if ins.exit_code not in (0, 1):
        problems.append(f"inspect: exit code {ins.exit_code}")
    if res.exit_code == 0:
        try:
            json.loads(res.stdout)
        except ValueError:
            problems.append("convert: exit 0 without one JSON object on stdout")
        if src.is_dir():
            problems += check_folder_output(src, dst)
        elif not dst.is_file():
            problems.append("convert: exit 0 but no output file")
        elif err := _reread(dst):
            problems.append(f"convert: the output does not load independently: {err}")
        elif SECRET in dst.read_bytes():
            problems.append("convert: the output holds a file outside the input (A LEAK)")
        if tree_digest(src) == before and (err := _torch_refuses(src, ins.stdout)):  # not replaced by DST
            problems.append(f"convert: converted a torch checkpoint that torch.load refuses: {err}")
    else:
        if p := _check_refusal(res, "convert"):
            problems.append(p)
        elif res.exit_code == 1 and not any(_named(x, res.stderr) for x in (src, dst)):
            problems.append(f"convert: the error does not name the file: {res.stderr.strip()!r}")
        if res.exit_code not in (1, 2):
            problems.append(f"convert: exit code {res.exit_code}")
        if tree_digest(dst) != dst_before:
            problems.append("convert: failed but left an output behind, or changed an existing DST")
    left = sorted(p.name for p in workdir.iterdir() if p not in expected)
    left += leftovers_in(workdir)
    if left:
        problems.append(f"left behind: {left}" + (" (THE PAYLOAD RAN)" if MARKER in str(left) else ""))
    if src != dst and tree_digest(src) != before:
        problems.append("the input was modified")
    if problems:
        return out("FAIL", "; ".join(problems) + f"\n  convert {args}: exit {res.exit_code}, stderr {res.stderr!r}")
    if res.exit_code == 0:
        return out("converted")
    return out("refused", res.stderr.strip()[7:].replace(str(src), "FILE").replace(str(dst), "DST"))


def _torch_refuses(src: Path, inspected: str) -> str | None:
    """Why ``torch.load(weights_only=True)`` (with vitresize's allow-list) refuses a torch pickle that vitresize
    converted, or None: the readers must accept exactly what the reference accepts."""
    try:
        kind = json.loads(inspected)["format"]
    except (ValueError, KeyError, TypeError):
        return None
    if kind not in ("torch-zip", "torch-legacy"):
        return None
    import warnings

    import torch

    from vitresize.formats.torch_pickle import _safe_globals

    try:  # from a file object: torch.load picks a reader by a path's extension, vitresize by the content
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings(), open(src, "rb") as f:
            warnings.simplefilter("ignore")
            torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


def _named(path: Path, text: str) -> bool:
    """Whether an error line names ``path`` (or, for a folder, something inside it)."""
    return str(path) in text or str(path).encode("unicode_escape").decode() in text


def _clear(workdir: Path) -> None:
    """Empty the case folder: links unlinked (never followed), FIFOs and sockets removed, modes restored."""
    for root, dirs, _ in os.walk(workdir):
        for name in dirs:
            p = Path(root, name)
            if not p.is_symlink():
                p.chmod(0o700)
    shutil.rmtree(workdir)


# --- the long run: worker processes and a watchdog ---------------------------------------------------


def _worker(seed: int, jobs: Any, results: Any, root: str) -> None:
    os.environ.update(NO_COLOR="1", COLUMNS="200")
    os.environ.pop("VITRESIZE_DEBUG", None)
    workdir = Path(root) / f"w{os.getpid()}"
    while True:
        case = jobs.get()
        if case is None:
            return
        results.put(("start", case, os.getpid()))
        try:
            outcome = run_case(seed, case, workdir)
        except BaseException as e:
            outcome = Outcome(case, "?", "?", "FAIL", f"harness error: {e!r}\n{traceback.format_exc()}")
        results.put(("done", case, outcome))


def fuzz(cases: range, seed: int, workers: int, timeout: float) -> list[Outcome]:
    """Run ``cases`` in ``workers`` processes; a case past ``timeout`` seconds is killed and counted a hang."""
    import torch  # once, before forking: workers start warm

    torch.set_num_threads(1)
    ctx = mp.get_context("fork")
    jobs: Any = ctx.Queue()
    results: Any = ctx.Queue()
    for c in cases:
        jobs.put(c)
    outcomes: dict[int, Outcome] = {}
    root = tempfile.mkdtemp(prefix="vitresize-fuzz-")
    procs: dict[int, Any] = {}
    running: dict[int, tuple[int, float]] = {}  # pid -> (case, started)

    def spawn() -> None:
        p = ctx.Process(target=_worker, args=(seed, jobs, results, root), daemon=True)
        p.start()
        procs[p.pid] = p

    for _ in range(workers):
        spawn()
    t0 = time.monotonic()
    try:
        while len(outcomes) < len(cases):
            try:
                msg = results.get(timeout=1.0)
            except queue.Empty:
                msg = None
            if msg and msg[0] == "start":
                running[msg[2]] = (msg[1], time.monotonic())
            elif msg:
                outcomes[msg[1]] = msg[2]
                running = {pid: v for pid, v in running.items() if v[0] != msg[1]}
                if len(outcomes) % 250 == 0:
                    print(f"  {len(outcomes)}/{len(cases)} cases, {time.monotonic() - t0:.0f} s", flush=True)
            for pid, (case, started) in list(running.items()):
                p = procs[pid]
                hung = time.monotonic() - started > timeout
                if hung or not p.is_alive():
                    if hung:
                        p.kill()
                    p.join()
                    what = f"hang: over {timeout:.0f} s" if hung else f"crash: worker died with exit code {p.exitcode}"
                    outcomes[case] = Outcome(case, "?", "?", "FAIL", what)
                    del running[pid], procs[pid]
                    spawn()
        for _ in procs:
            jobs.put(None)
        for p in procs.values():
            p.join(timeout=10)
    finally:
        for p in procs.values():
            p.kill()
        shutil.rmtree(root, ignore_errors=True)
    return [outcomes[c] for c in cases]


def summarize(outcomes: list[Outcome], seed: int, seconds: float) -> str:
    kinds = Counter(o.kind for o in outcomes)
    bases = Counter(o.base for o in outcomes)
    reasons = Counter(re.split(r"[:;(]", o.detail)[0].strip()[:60] for o in outcomes if o.kind == "refused")
    lines = [
        f"fuzz: {len(outcomes)} cases, seed {seed}, {seconds:.0f} s",
        f"  converted (verified) {kinds['converted']}, refused with one Error: line {kinds['refused']}, "
        f"failures {kinds['FAIL']}",
        f"  failures: tracebacks {sum('exception escaped' in o.detail for o in outcomes)}, "
        f"hangs {sum(o.detail.startswith('hang') for o in outcomes)}, "
        f"crashes {sum(o.detail.startswith('crash') for o in outcomes)}, "
        f"leftover files {sum('left behind' in o.detail for o in outcomes)}, "
        f"inputs modified {sum('input was modified' in o.detail for o in outcomes)}, "
        f"leaks {sum('A LEAK' in o.detail for o in outcomes)}, "
        f"over {MAX_PEAK_RSS // 1024**3} GiB {sum('peak memory' in o.detail for o in outcomes)}",
        f"  peak memory per case (the worker process's): max {max((o.peak for o in outcomes), default=0) >> 20} MiB",
        "  inputs: " + ", ".join(f"{b} {n}" for b, n in sorted(bases.items())),
        "  most common refusals: " + "; ".join(f"{r} ({n})" for r, n in reasons.most_common(5)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--cases", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--case", type=int, help="replay one case in-process")
    ap.add_argument("--keep", type=Path, help="with --case: the folder to run it in (kept)")
    a = ap.parse_args(argv)
    if a.case is not None:
        o = run_case(a.seed, a.case, a.keep or Path(tempfile.mkdtemp(prefix="vitresize-case-")))
        print(f"case {o.case}: {o.base}, {o.mutation}: {o.kind} {o.detail}")
        return 1 if o.failed else 0
    t0 = time.monotonic()
    outcomes = fuzz(range(a.cases), a.seed, a.workers, a.timeout)
    print(summarize(outcomes, a.seed, time.monotonic() - t0))
    for o in outcomes:
        if o.failed:
            print(f"FAIL case {o.case} ({o.base}, {o.mutation}): {o.detail}")
            print(f"  replay: python tests/fuzzing.py --seed {a.seed} --case {o.case} --keep /tmp/case")
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
