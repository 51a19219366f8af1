"""``make bench``: vitresize against ``cp``, ``import torch`` and the timm route, measured in one run.

Random-init checkpoints of ViT-B/16, ViT-L/16, ViT-H/14 and ViT-g/14 size (timm key names and shapes, fp32)
are written once under ``$VITRESIZE_BENCH_DIR`` (default ``~/.cache/vitresize-bench``), as .safetensors and
as zip .pth. Every command runs as its own process; wall time and that process's peak RSS (``wait4``) are
taken, medians of ``--repeat`` runs, page cache warm. Ratios are against baselines of the same run:

* wall / cp            -- conversion time over ``cp`` of the same file: the median over rounds of the two
                          measured back to back in each round
* RSS / file           -- peak RSS over the file size
* RSS - torch          -- peak RSS minus that of ``python -c "import torch"``
* vs timm              -- the timm route's wall and peak RSS over vitresize's (create_model at the new
                          size, load, ``checkpoint_filter_fn``, ``load_state_dict``, ``save_file``)

``python benchmarks/bench.py --quick`` measures ViT-B only (a CI smoke run); ``--huge`` is the scale check.

The ``batch`` rows (also alone with ``--batch``): 100 small conversions (ViT-Ti/16 files, safetensors and zip
.pth in, safetensors and .pth out, new image sizes and patches) as one ``vitresize batch`` process, with
``--jobs 1`` and ``--jobs N``, against 100 ``vitresize convert`` processes one after another; ``x faster`` is
the convert processes' total wall time over the batch's, round by round, and the outputs are checked
byte-identical.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
VITRESIZE = [PY, "-m", "vitresize"]
MIB = 1024 * 1024


@dataclass(frozen=True)
class Model:
    name: str
    timm_name: str
    dim: int
    depth: int
    mlp: int
    patch: int


MODELS = [
    Model("ViT-B/16", "vit_base_patch16_224", 768, 12, 3072, 16),
    Model("ViT-L/16", "vit_large_patch16_224", 1024, 24, 4096, 16),
    Model("ViT-H/14", "vit_huge_patch14_224", 1280, 32, 5120, 14),
    Model("ViT-g/14", "vit_giant_patch14_224", 1408, 40, 6144, 14),
]
HUGE = Model("ViT-22B/14", "vit_22b_patch14_224", 6144, 48, 24576, 14)
SMALL = Model("ViT-Ti/16", "vit_tiny_patch16_224", 192, 12, 768, 16)
"""The model of the ``batch`` rows: many small conversions, where a process's start-up is most of the cost."""


def shapes(m: Model, img: int = 224) -> list[tuple[str, tuple[int, ...]]]:
    """timm's VisionTransformer state dict (class token, 1000 classes), in its order."""
    grid = img // m.patch
    out: list[tuple[str, tuple[int, ...]]] = [
        ("cls_token", (1, 1, m.dim)),
        ("pos_embed", (1, 1 + grid * grid, m.dim)),
        ("patch_embed.proj.weight", (m.dim, 3, m.patch, m.patch)),
        ("patch_embed.proj.bias", (m.dim,)),
    ]
    for i in range(m.depth):
        b = f"blocks.{i}."
        out += [
            (b + "norm1.weight", (m.dim,)),
            (b + "norm1.bias", (m.dim,)),
            (b + "attn.qkv.weight", (3 * m.dim, m.dim)),
            (b + "attn.qkv.bias", (3 * m.dim,)),
            (b + "attn.proj.weight", (m.dim, m.dim)),
            (b + "attn.proj.bias", (m.dim,)),
            (b + "norm2.weight", (m.dim,)),
            (b + "norm2.bias", (m.dim,)),
            (b + "mlp.fc1.weight", (m.mlp, m.dim)),
            (b + "mlp.fc1.bias", (m.mlp,)),
            (b + "mlp.fc2.weight", (m.dim, m.mlp)),
            (b + "mlp.fc2.bias", (m.dim,)),
        ]
    out += [("norm.weight", (m.dim,)), ("norm.bias", (m.dim,)), ("head.weight", (1000, m.dim)), ("head.bias", (1000,))]
    return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        n = _numel(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def make_checkpoints(m: Model, folder: Path) -> tuple[Path, Path]:
    """``(model.safetensors, model.pth)``, made once, in a child process: this one stays small, because a
    child's peak RSS starts from its parent's size at fork."""
    stem = m.timm_name
    st, pth = folder / f"{stem}.safetensors", folder / f"{stem}.pth"
    entries = shapes(m)
    if (
        st.exists()
        and pth.exists()
        and st.stat().st_size == len(_header(entries)) + 4 * sum(_numel(s) for _, s in entries)
    ):
        return st, pth
    print(f"  writing {m.name} checkpoints to {folder} (once)", flush=True)
    subprocess.run([PY, __file__, "--make", m.name, "--dir", str(folder)], check=True)
    return st, pth


def _write_checkpoints(m: Model, folder: Path) -> None:
    import torch

    st, pth = folder / f"{m.timm_name}.safetensors", folder / f"{m.timm_name}.pth"
    entries = shapes(m)
    gen = torch.Generator().manual_seed(0)
    sd = {name: torch.empty(shape).uniform_(-0.05, 0.05, generator=gen) for name, shape in entries}
    with open(st, "wb") as f:
        f.write(_header(entries))
        for name, _ in entries:
            f.write(sd[name].numpy().tobytes())
    torch.save(sd, pth)


@dataclass
class Run:
    wall: float
    rss: int  # bytes
    walls: tuple[float, ...] = ()  # every round's wall time, in order


def paired_ratio(run: Run, base: Run) -> float:
    """Median over rounds of ``run / base`` within each round: the two ran back to back, so a round where the
    disk was slow for both cancels out (a ratio of medians does not)."""
    return statistics.median(a / b for a, b in zip(run.walls, base.walls, strict=True))


@dataclass(frozen=True)
class Cmd:
    argv: list[str]
    env: dict[str, str] | None = None
    outputs: tuple[Path, ...] = ()
    cold: bool = False  # drop the page cache first (root): the input, and the programs' own files, read from disk


def _run_once(cmd: Cmd) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one run of ``cmd`` as a child process.

    The outputs of the last run are deleted and the page cache synced first (not timed): otherwise a run
    pays for the write-back of the previous run's gigabytes.
    """
    for p in cmd.outputs:
        p.unlink(missing_ok=True)
    os.sync()
    if cmd.cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd.argv, stdout=subprocess.DEVNULL, stderr=err, env=cmd.env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        wall = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            raise SystemExit(f"benchmark command failed ({code}): {' '.join(cmd.argv)}\n{err.read().decode()}")
    return wall, usage.ru_maxrss * 1024  # kB on Linux


def measure_interleaved(cmds: dict[str, Cmd], repeat: int) -> dict[str, Run]:
    """Median wall time and peak RSS of each command over ``repeat`` rounds, the commands taking turns
    within a round: the disk of a VM drifts over minutes, and taking turns spreads that drift evenly
    over the command and its baseline (``cp``) instead of favouring whichever ran at a good moment."""
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in cmds}
    for _ in range(repeat):
        for name, cmd in cmds.items():
            samples[name].append(_run_once(cmd))
    return {
        name: Run(statistics.median(w for w, _ in s), int(statistics.median(r for _, r in s)), tuple(w for w, _ in s))
        for name, s in samples.items()
    }


def measure(cmd: list[str], repeat: int, env: dict[str, str] | None = None, outputs: Sequence[Path] = ()) -> Run:
    """Median wall time and median peak RSS of ``cmd`` run ``repeat`` times (see :func:`_run_once`)."""
    return measure_interleaved({"cmd": Cmd(cmd, env, tuple(outputs))}, repeat)["cmd"]


TIMM_ROUTE = """
import sys, torch, timm
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import checkpoint_filter_fn
src, dst, name, img = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = timm.create_model(name, pretrained=False, img_size=img, num_classes=1000)
sd = load_file(src) if src.endswith(".safetensors") else torch.load(src, map_location="cpu", weights_only=True)
sd = checkpoint_filter_fn(sd, model)
model.load_state_dict(sd)
save_file(model.state_dict(), dst)
"""


def _warm(path: Path) -> None:
    """Read a file once so that every measured command finds it in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 * MIB):
            pass


def _fmt_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def bench(models: list[Model], folder: Path, repeat: int, timm_repeat: int) -> list[list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix="vitresize-bench-out-", dir=folder))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        torch_base = measure([PY, "-c", "import torch"], repeat)
        timm_base = measure([PY, "-c", "import torch, timm"], repeat)
        help_run = measure([*VITRESIZE, "--help"], repeat, env)
        print(
            f"baselines: python -c 'import torch' {torch_base.wall:.2f} s, {torch_base.rss / MIB:.0f} MiB; "
            f"'import torch, timm' {timm_base.wall:.2f} s, {timm_base.rss / MIB:.0f} MiB; "
            f"vitresize --help {help_run.wall:.2f} s ({help_run.wall / torch_base.wall:.2f}x import torch), "
            f"{help_run.rss / MIB:.0f} MiB",
            flush=True,
        )
        rows = []
        for m in models:
            st, pth = make_checkpoints(m, folder)
            half = m.patch // 2
            for src in (st, pth):
                size = src.stat().st_size
                dst = out_dir / "out.safetensors"
                _warm(src)
                fmt = "safetensors" if src.suffix == ".safetensors" else "zip .pth"
                img = 384 if 384 % m.patch == 0 else 392  # 224 -> 384 (/16) or 392 (/14)
                timm_run = measure(
                    [PY, "-c", TIMM_ROUTE, str(src), str(dst), m.timm_name, str(img)], timm_repeat, env, [dst]
                )
                ops = {f"224->{img}": ["--img-size", str(img)], f"patch {m.patch}->{half}": ["--patch", str(half)]}
                cmds = {"cp": Cmd(["cp", str(src), str(out_dir / "copy")], None, (out_dir / "copy",))}
                for op, args in ops.items():
                    argv = [*VITRESIZE, "convert", str(src), str(dst), *args, "--force", "-q"]
                    cmds[op] = Cmd(argv, env, (dst,))
                runs = measure_interleaved(cmds, repeat)
                cp = runs["cp"]
                for op, args in ops.items():
                    run = runs[op]
                    rows.append(
                        [
                            m.name,
                            fmt,
                            f"{size / 1e9:.2f} GB",
                            op,
                            f"{run.wall:.2f} s",
                            f"{paired_ratio(run, cp):.2f}",
                            f"{run.rss / MIB:.0f} MiB",
                            f"{run.rss / size:.2f}",
                            f"{(run.rss - torch_base.rss) / MIB:+.0f} MiB",
                            f"{cp.wall:.2f} s",
                            f"{timm_run.wall:.1f} s / {timm_run.rss / MIB:.0f} MiB" if args[0] == "--img-size" else "",
                            f"{timm_run.wall / run.wall:.1f}x / {timm_run.rss / run.rss:.1f}x"
                            if args[0] == "--img-size"
                            else "",
                        ]
                    )
                    print(_fmt_row(rows[-1], [9, 11, 8, 14, 8, 7, 9, 8, 10, 7, 20, 12]), flush=True)
                for p in out_dir.iterdir():
                    p.unlink()
        return rows
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


BATCH_HEADER = ["batch rows", "wall", "per line", "x faster", "peak RSS", "outputs"]
BATCH_WIDTHS = [16, 9, 9, 9, 9, 9]


def _batch_work(folder: Path, out_dir: Path, count: int) -> tuple[Path, list[tuple[list[str], Path]], list[Path]]:
    """The manifest of ``count`` conversions (its outputs under ``batch/``), the same conversions as ``convert``
    commands (outputs under ``convert/``, same names: a .pth records its file name), and the batch's outputs."""
    st, pth = make_checkpoints(SMALL, folder)
    ops = [
        (st, ".safetensors", {"img_size": 384}),
        (pth, ".safetensors", {"img_size": 384}),
        (st, ".safetensors", {"patch": 8}),
        (pth, ".pth", {"img_size": 384}),
    ]
    for sub in ("batch", "convert"):
        (out_dir / sub).mkdir(exist_ok=True)
    lines, converts, outputs = [], [], []
    for i in range(count):
        src, suffix, fields = ops[i % len(ops)]
        name = f"{i:03d}{suffix}"
        lines.append(json.dumps({"src": str(src), "dst": f"batch/{name}", **fields}))
        args = [a for k, v in fields.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        dst = out_dir / "convert" / name
        converts.append(([*VITRESIZE, "convert", str(src), str(dst), *args, "-q"], dst))
        outputs.append(out_dir / "batch" / name)
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, converts, outputs


def batch_bench(folder: Path, repeat: int, count: int) -> list[list[str]]:
    """``count`` small conversions: one ``vitresize batch`` (``--jobs 1`` and ``--jobs N``) against as many
    ``vitresize convert`` processes, taking turns in each of ``repeat`` rounds; outputs checked identical."""
    folder.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix="vitresize-bench-batch-", dir=folder))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    jobs = max(2, min(4, os.cpu_count() or 1))
    try:
        manifest, converts, outputs = _batch_work(folder, out_dir, count)
        batches = {
            f"batch --jobs {j}": Cmd([*VITRESIZE, "batch", str(manifest), "--jobs", str(j), "-q"], env, tuple(outputs))
            for j in (1, jobs)
        }
        walls: dict[str, list[float]] = {"convert": [], **{name: [] for name in batches}}
        rss: dict[str, list[int]] = {name: [] for name in walls}
        for _ in range(repeat):
            total, peak = 0.0, 0
            for argv, dst in converts:
                wall, r = _run_once(Cmd(argv, env, (dst,)))
                total, peak = total + wall, max(peak, r)
            walls["convert"].append(total)
            rss["convert"].append(peak)
            for name, cmd in batches.items():
                wall, r = _run_once(cmd)
                walls[name].append(wall)
                rss[name].append(r)
        for name, cmd in batches.items():  # every output byte-identical to its convert's, for each --jobs
            _run_once(cmd)
            for out, (_, ref) in zip(outputs, converts, strict=True):
                if out.read_bytes() != ref.read_bytes():
                    raise SystemExit(f"{name}: {out.name} differs from the output of vitresize convert")
        rows = []
        for name in walls:
            ratio = statistics.median(c / w for c, w in zip(walls["convert"], walls[name], strict=True))
            label = f"{count} x convert" if name == "convert" else name
            rows.append(
                [
                    label,
                    f"{statistics.median(walls[name]):.2f} s",
                    f"{statistics.median(walls[name]) / count * 1000:.0f} ms",
                    "" if name == "convert" else f"{ratio:.1f}x",
                    f"{statistics.median(rss[name]) / MIB:.0f} MiB",
                    "identical" if name != "convert" else "",
                ]
            )
            print(_fmt_row(rows[-1], BATCH_WIDTHS), flush=True)
        return rows
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def huge(folder: Path) -> None:
    """A ViT-22B-sized safetensors file (~87 GB fp32), sparse: header and the two resampled tensors real."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = shapes(HUGE)
    head = _header(entries)
    total = len(head) + 4 * sum(_numel(s) for _, s in entries)
    src = folder / "vit_22b_sparse.safetensors"
    if not src.exists() or src.stat().st_size != total:
        subprocess.run([PY, __file__, "--make", HUGE.name, "--dir", str(folder)], check=True)
    used = src.stat().st_blocks * 512
    print(f"{HUGE.name}: {total / 1e9:.1f} GB file, {used / MIB:.0f} MiB on disk (sparse), RAM {_ram() / 1e9:.0f} GB")
    dst = folder / "vit_22b_392.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        torch_base = measure([PY, "-c", "import torch"], 1)
        run = measure([*VITRESIZE, "convert", str(src), str(dst), "--img-size", "392", "--force", "-q"], 1, env, [dst])
        print(
            f"vitresize convert 224->392: {run.wall:.1f} s, peak RSS {run.rss / MIB:.0f} MiB "
            f"({(run.rss - torch_base.rss) / MIB:+.0f} MiB over import torch; {run.rss / total:.4f} of the file size)"
        )
        print(f"output {dst.stat().st_size / 1e9:.1f} GB, {dst.stat().st_blocks * 512 / MIB:.0f} MiB on disk")
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def _write_sparse(folder: Path) -> None:
    import torch

    entries = shapes(HUGE)
    head = _header(entries)
    total = len(head) + 4 * sum(_numel(s) for _, s in entries)
    src = folder / "vit_22b_sparse.safetensors"
    with open(src, "wb") as f:
        f.truncate(total)
        f.write(head)
        offset = len(head)
        gen = torch.Generator().manual_seed(0)
        for name, shape in entries:
            if name in ("pos_embed", "patch_embed.proj.weight"):
                f.seek(offset)
                f.write(torch.empty(shape).uniform_(-0.05, 0.05, generator=gen).numpy().tobytes())
            offset += 4 * _numel(shape)


COW_HEADER = ["on XFS (reflink)", "operation", "wall", "wall/cp", "cp", "cloned", "own blocks", "changed", "peak RSS"]
COW_WIDTHS = [34, 10, 8, 7, 7, 11, 10, 9, 9]


@contextlib.contextmanager
def _xfs(folder: Path, size: int) -> Iterator[Path]:
    """A loop-mounted XFS with reflink (a sparse image of ``size`` bytes), unmounted and deleted after."""
    image, mnt = folder / "cow-xfs.img", folder / "cow-xfs"
    with image.open("wb") as f:
        f.truncate(max(size, 400 << 20))
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        image.unlink(missing_ok=True)


def _cow_row(
    label: str, op: str, src: Path, dst: Path, img: int, changed: int, repeat: int, cold: bool = False
) -> list[str]:
    """One conversion on the XFS mount against ``cp --reflink=never`` of its input, taking turns (``cold``: the
    page cache dropped before each run of either)."""
    from vitresize.formats._fiemap import shared_bytes

    cp_out = dst.with_name("cp" + src.suffix)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = measure_interleaved(
        {
            "cp": Cmd(["cp", "--reflink=never", str(src), str(cp_out)], outputs=(cp_out,), cold=cold),
            "vitresize": Cmd([*VITRESIZE, "convert", str(src), str(dst), "--img-size", str(img), "--force", "-q"],
                             env, (dst,), cold),
        },
        repeat,
    )  # fmt: skip
    os.sync()
    shared = shared_bytes(dst) or 0
    own = dst.stat().st_blocks * 512 - shared
    cp_out.unlink(missing_ok=True)
    row = [
        label,
        op,
        f"{runs['vitresize'].wall:.2f} s",
        f"{paired_ratio(runs['vitresize'], runs['cp']):.2f}",
        f"{runs['cp'].wall:.2f} s",
        f"{shared / MIB:.0f} MiB",
        f"{own / MIB:.1f} MiB",
        f"{changed / MIB:.1f} MiB",
        f"{runs['vitresize'].rss / MIB:.0f} MiB",
    ]
    print(_fmt_row(row, COW_WIDTHS), flush=True)
    return row


def cow_bench(models: list[Model], folder: Path, repeat: int) -> list[list[str]]:
    """On a loop-mounted XFS with reflink: ``vitresize convert`` (safetensors -> safetensors, zip .pth -> .pth
    and -> safetensors) against ``cp --reflink=never`` of the same file, the bytes of the output cloned and
    the disk it takes of its own (its blocks not shared); and the sparse ViT-22B-sized file (its holes stay holes,
    so cp's time is that of reading them). ``changed`` is the bytes of the tensors that change (the position
    table). Needs root and mkfs.xfs (``make install-cow-tools``); says why it is skipped otherwise."""
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        print("copy-on-write rows skipped: they need root and mkfs.xfs (make install-cow-tools)")
        return []
    print(_fmt_row(COW_HEADER, COW_WIDTHS))
    rows = []
    for m in models:
        st, pth = make_checkpoints(m, folder)
        img = 384 if 384 % m.patch == 0 else 392
        changed = 4 * sum(_numel(s) for k, s in shapes(m, img) if k == "pos_embed")  # the patch stays
        size = st.stat().st_size
        with _xfs(folder, 4 * size + (1 << 30)) as mnt:
            for src in (st, pth):
                subprocess.run(["cp", "--reflink=never", str(src), str(mnt / src.name)], check=True)
            for src, dst in ((st, "out.safetensors"), (pth, "out.pth"), (pth, "out.safetensors")):
                fmt = "safetensors" if src.suffix == ".safetensors" else "zip .pth"
                label = f"{m.name} {fmt} -> {Path(dst).suffix.lstrip('.')}"
                rows.append(_cow_row(label, f"224->{img}", mnt / src.name, mnt / dst, img, changed, repeat))
                (mnt / dst).unlink(missing_ok=True)
            label = f"{m.name} safetensors, cold cache"  # a checkpoint at rest: nothing of it in memory
            cold = _cow_row(label, f"224->{img}", mnt / st.name, mnt / "out.safetensors", img, changed, repeat, True)
            rows.append(cold)
    with _xfs(folder, 4 << 30) as mnt:
        subprocess.run([PY, __file__, "--make", HUGE.name, "--dir", str(mnt)], check=True)
        src = mnt / "vit_22b_sparse.safetensors"
        changed = 4 * sum(_numel(s) for k, s in shapes(HUGE, 392) if k == "pos_embed")
        label = f"{HUGE.name} safetensors ({src.stat().st_size / 1e9:.0f} GB sparse)"
        rows.append(_cow_row(label, "224->392", src, mnt / "out.safetensors", 392, changed, max(1, repeat // 3)))
    return rows


def _ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="ViT-B only (CI smoke run)")
    ap.add_argument("--huge", action="store_true", help="the ViT-22B-sized sparse scale check only")
    ap.add_argument("--batch", action="store_true", help="the batch rows only")
    ap.add_argument("--cow", action="store_true", help="the copy-on-write (XFS reflink) rows only; root, mkfs.xfs")
    ap.add_argument("--batch-count", type=int, default=100, help="conversions of the batch rows")
    ap.add_argument("--batch-repeat", type=int, default=3, help="rounds of the batch rows (medians)")
    ap.add_argument("--repeat", type=int, default=7, help="rounds of cp and vitresize runs (medians)")
    ap.add_argument("--make", help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="+", metavar="MODEL", help="e.g. --only ViT-H/14 ViT-g/14")
    ap.add_argument("--timm-repeat", type=int, default=1, help="runs of the (slow) timm route per file")
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("VITRESIZE_BENCH_DIR", "~/.cache/vitresize-bench")))
    a = ap.parse_args()
    folder = a.dir.expanduser()
    if a.make:
        if a.make == HUGE.name:
            _write_sparse(folder)
        else:
            _write_checkpoints(next(m for m in [*MODELS, SMALL] if m.name == a.make), folder)
        return
    print(f"machine: {os.cpu_count()} cores, {_ram() / 2**30:.0f} GiB RAM, Python {sys.version.split()[0]}")
    # An installed wheel has its bytecode; an editable install compiles each module at every start where
    # PYTHONDONTWRITEBYTECODE is set (as on this project's machines): ~0.14 s of a conversion's ~0.4 s start-up.
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "vitresize")], check=True, stdout=subprocess.DEVNULL)
    if a.huge:
        huge(folder)
        return
    if a.batch:
        print(f"{a.batch_count} {SMALL.name} conversions ({SMALL.timm_name}): one process vs one per conversion")
        print(_fmt_row(BATCH_HEADER, BATCH_WIDTHS))
        batch_bench(folder, a.batch_repeat, a.batch_count)
        return
    models = MODELS[:1] if a.quick else [m for m in MODELS if not a.only or m.name in a.only]
    if a.cow:
        cow_bench(models if a.only else [MODELS[-1]], folder, a.repeat)
        return
    header = ["model", "format", "size", "operation", "wall", "wall/cp", "peak RSS", "RSS/file", "RSS-torch", "cp",
              "timm route", "vs timm"]  # fmt: skip
    print(_fmt_row(header, [9, 11, 8, 14, 8, 7, 9, 8, 10, 7, 20, 12]))
    bench(models, folder, a.repeat, a.timm_repeat)
    if not a.quick:
        print(f"\n{a.batch_count} {SMALL.name} conversions ({SMALL.timm_name}): one process vs one per conversion")
        print(_fmt_row(BATCH_HEADER, BATCH_WIDTHS))
        batch_bench(folder, a.batch_repeat, a.batch_count)
        print()
        cow_bench([MODELS[-1]], folder, a.repeat)


if __name__ == "__main__":
    main()
