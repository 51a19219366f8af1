"""``make fidelity``: the test accuracy a ViT keeps at a new image or patch size with no fine-tuning, per method.

Small timm ViTs (``vit_tiny_patch16_224`` at 32 px, patch 4, width 64, depth 4) are trained from scratch on
scikit-learn's digits (1797 8x8 images, upscaled to 32x32 bicubic, 3 channels; a fixed stratified 75/25
split), one per seed, and saved as .safetensors under ``$VITRESIZE_FIDELITY_DIR`` (default
``~/.cache/vitresize-fidelity``). Each is converted with the public API (``vitresize.convert``) to every
target cell -- image sizes down and up, patch sizes with the image or the grid kept, non-square images --
with every method of ``vitresize.resample.conventions.METHODS`` and, where the patch size changes, both
patch methods (``pi``, ``interp``). Each conversion is loaded into a timm model built at the target geometry
(``load_state_dict(strict=True)``) and evaluated on the test split, the images resized (bicubic,
antialiased) from 32 px to the target size. Mean and std over the seeds per (cell, method).

The patch tokens' position embedding starts from a 2-D sin-cos table (then learned): a table learned from
random init on 1347 images stays noisy, unlike those of real pretrained ViTs, and resampling a noisy table
measures the noise rather than the method.

``python benchmarks/fidelity.py`` trains, converts, evaluates and compares the numbers with the committed
``benchmarks/fidelity/results.json``: every cell must lie within the seed spread (``|new - old| <= max(2 *
std_old, 1 point)``, the old mean taken over the seeds run) or the script exits 1. ``--update`` rewrites
``results.json``, ``table.md`` and ``fidelity.png`` instead; ``--quick`` is a smoke run (1 seed, 4 cells);
``--reuse`` takes the trained checkpoints from the cache when they exist; ``--replot`` only redraws the table
and the figure from ``results.json``. Per cell, the default (method ``native``, i.e. timm's convention, patch
method ``pi``) is set against the best method: by the means (within 1 point?) and seed by seed (paired).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "fidelity"
THREADS = 2

SRC_IMG = 32
SRC_PATCH = 4
ARCH: dict[str, Any] = {"embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}
TRAIN: dict[str, Any] = {
    "epochs": 15,
    "batch_size": 32,
    "lr": 1e-3,
    "weight_decay": 0.05,
    "warmup": 0.1,
    "label_smoothing": 0.1,
    "test_size": 0.25,
    "split_seed": 0,
    "pos_init": "sincos",
}
SEEDS = (0, 1, 2)
DEFAULT_METHOD = "timm"  # what method "native" resolves to for a timm checkpoint
DEFAULT_PATCH_METHOD = "pi"
TOLERANCE = 1.0  # points: the least difference the comparison allows, and the default-vs-best margin
EVAL_BATCH = 50


@dataclass(frozen=True)
class Cell:
    """A target geometry: image size (height, width) and patch size; ``kind`` picks the figure's panel."""

    name: str
    img: tuple[int, int]
    patch: int
    kind: str  # "resolution" or "patch"

    @property
    def patch_changes(self) -> bool:
        return self.patch != SRC_PATCH


CELLS = [
    Cell("16 px (grid 4)", (16, 16), 4, "resolution"),
    Cell("24 px (grid 6)", (24, 24), 4, "resolution"),
    Cell("48 px (grid 12)", (48, 48), 4, "resolution"),
    Cell("64 px (grid 16)", (64, 64), 4, "resolution"),
    Cell("96 px (grid 24)", (96, 96), 4, "resolution"),
    Cell("32 px, patch 2 (grid 16)", (32, 32), 2, "patch"),
    Cell("32 px, patch 8 (grid 4)", (32, 32), 8, "patch"),
    Cell("16 px, patch 2 (grid 8 kept)", (16, 16), 2, "patch"),
    Cell("64 px, patch 8 (grid 8 kept)", (64, 64), 8, "patch"),
    Cell("32x48 px (grid 8x12)", (32, 48), 4, "patch"),
    Cell("48x32 px (grid 12x8)", (48, 32), 4, "patch"),
]
QUICK_CELLS = ("16 px (grid 4)", "64 px (grid 16)", "32 px, patch 2 (grid 16)", "32x48 px (grid 8x12)")


# --------------------------------------------------------------------------------------------------- data


@dataclass
class Digits:
    """The digits at 32 px in [0, 1], (N, 3, 32, 32), and the fixed split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits() -> Digits:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = resize(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0, (SRC_IMG, SRC_IMG)).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.int64)
    train, test = train_test_split(
        np.arange(len(y)), test_size=TRAIN["test_size"], random_state=TRAIN["split_seed"], stratify=d.target
    )
    return Digits(x[train], y[train], x[test], y[test])


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased, clamped to [0, 1]; a no-op at the same size."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0.0, 1.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5


# ------------------------------------------------------------------------------------------------- models


def build_model(img: tuple[int, int], patch: int) -> torch.nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=patch, num_classes=10, **ARCH
    )


def config_id() -> str:
    """A short hash of everything that decides the trained weights (the checkpoints' file names)."""
    import timm
    import torch

    text = json.dumps([SRC_IMG, SRC_PATCH, ARCH, TRAIN, torch.__version__, timm.__version__], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _init_pos_embed(model: torch.nn.Module) -> None:
    import torch
    from timm.layers import build_sincos2d_pos_embed

    grid = SRC_IMG // SRC_PATCH
    with torch.no_grad():
        pos = model.pos_embed  # type: ignore[union-attr]
        pos[0, 1:] = build_sincos2d_pos_embed([grid, grid], ARCH["embed_dim"])
        pos[0, :1] = 0.0


def _lr_factor(step: int, total: int) -> float:
    warm = max(1, int(total * TRAIN["warmup"]))
    return min(1.0, (step + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * step / total))


def train(seed: int, data: Digits) -> dict[str, torch.Tensor]:
    """One ViT trained from scratch at 32 px, patch 4 (AdamW, warmup + cosine); its state dict."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model((SRC_IMG, SRC_IMG), SRC_PATCH)
    _init_pos_embed(model)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    bs, n = TRAIN["batch_size"], len(data.y_train)
    total = TRAIN["epochs"] * math.ceil(n / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total))
    x = normalize(data.x_train)
    model.train()
    for _ in range(TRAIN["epochs"]):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            loss = F.cross_entropy(model(x[idx]), data.y_train[idx], label_smoothing=TRAIN["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def checkpoint(seed: int, data: Digits, folder: Path, reuse: bool) -> tuple[Path, float]:
    """The trained checkpoint of ``seed`` (trained now unless ``reuse`` finds it) and the seconds spent training."""
    from safetensors.torch import save_file

    path = folder / f"digits_vit_s{seed}_{config_id()}.safetensors"
    if reuse and path.exists():
        return path, 0.0
    t0 = time.perf_counter()
    sd = train(seed, data)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path, time.perf_counter() - t0


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent; ``x`` in [0, 1]."""
    import torch

    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(y), EVAL_BATCH):
            logits = model(normalize(x[i : i + EVAL_BATCH]))
            correct += int((logits.argmax(1) == y[i : i + EVAL_BATCH]).sum())
    return 100.0 * correct / len(y)


# ----------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Row:
    """One table row: a cell and the patch method it was converted with."""

    cell: Cell
    patch_method: str

    @property
    def key(self) -> str:
        return f"{self.cell.name} [{self.patch_method}]" if self.cell.patch_changes else self.cell.name


def rows_of(cells: Sequence[Cell]) -> list[Row]:
    from vitresize.resample.conventions import PATCH_METHODS

    return [Row(c, pm) for c in cells for pm in (PATCH_METHODS if c.patch_changes else (DEFAULT_PATCH_METHOD,))]


def _digest(path: Path) -> str:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].numpy().tobytes())
    return h.hexdigest()[:16]


class Evaluator:
    """Converts one checkpoint to the rows' geometries and evaluates each conversion (byte-identical ones once)."""

    def __init__(self, data: Digits, workdir: Path) -> None:
        self.data = data
        self.workdir = workdir
        self.images: dict[tuple[int, int], torch.Tensor] = {}
        self.cache: dict[tuple[str, str], float] = {}

    def test_images(self, size: tuple[int, int]) -> torch.Tensor:
        if size not in self.images:
            self.images[size] = resize(self.data.x_test, size)
        return self.images[size]

    def source(self, src: Path) -> float:
        from safetensors.torch import load_file

        model = build_model((SRC_IMG, SRC_IMG), SRC_PATCH)
        model.load_state_dict(load_file(str(src)), strict=True)
        return accuracy(model, self.data.x_test, self.data.y_test)

    def run(self, src: Path, row: Row, method: str) -> tuple[float | None, str]:
        """``(accuracy, digest)``, or ``(None, error)`` where vitresize refuses the cell for the method."""
        from safetensors.torch import load_file

        import vitresize

        dst = self.workdir / "out.safetensors"
        cell = row.cell
        try:
            vitresize.convert(
                src, dst, img_size=cell.img, patch=cell.patch, method=method, patch_method=row.patch_method, force=True
            )
        except vitresize.UsageError as e:
            return None, f"{type(e).__name__}: {e}"
        key = (cell.name, _digest(dst))
        if key not in self.cache:
            model = build_model(cell.img, cell.patch)
            model.load_state_dict(load_file(str(dst)), strict=True)
            self.cache[key] = accuracy(model, self.test_images(cell.img), self.data.y_test)
        return self.cache[key], key[1]


# ------------------------------------------------------------------------------------------------ results


def _stats(per_seed: dict[str, float]) -> dict[str, Any]:
    vals = list(per_seed.values())
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    rounded = {k: round(v, 3) for k, v in per_seed.items()}
    return {"per_seed": rounded, "mean": round(statistics.fmean(vals), 3), "std": round(std, 3)}


def collect(
    rows: list[Row], methods: list[str], seeds: Sequence[int], ckpts: dict[int, Path], ev: Evaluator
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Every (row, method) over the seeds, and the groups of methods whose conversions were byte-identical."""
    out: list[dict[str, Any]] = []
    signature: dict[str, list[str]] = {m: [] for m in methods}
    for row in rows:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {
            "row": row.key,
            "cell": row.cell.name,
            "kind": row.cell.kind,
            "img_size": list(row.cell.img),
            "patch": row.cell.patch,
            "patch_method": row.patch_method,
            "methods": {},
        }
        for method in methods:
            accs: dict[str, float] = {}
            error = None
            for seed in seeds:
                acc, digest = ev.run(ckpts[seed], row, method)
                signature[method].append(digest)
                if acc is None:
                    error = digest
                else:
                    accs[str(seed)] = acc
            entry["methods"][method] = {"na": error} if error else _stats(accs)
        out.append(entry)
        print(f"  {row.key:<38} {_row_summary(entry)}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    groups: dict[tuple[str, ...], list[str]] = {}
    for m in methods:
        groups.setdefault(tuple(signature[m]), []).append(m)
    return out, list(groups.values())


def _row_summary(entry: dict[str, Any]) -> str:
    d = entry["methods"].get(DEFAULT_METHOD, {})
    best_m, best = _best(entry)
    default = f"{d['mean']:5.1f}" if "mean" in d else "  n/a"
    return f"default {default}   best {best:5.1f} ({best_m})"


def _best(entry: dict[str, Any]) -> tuple[str, float]:
    scored = [(v["mean"], m) for m, v in entry["methods"].items() if "mean" in v]
    mean, method = max(scored, key=lambda t: t[0]) if scored else (float("nan"), "n/a")
    return method, mean


def paired_gap(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a - b`` seed by seed (the same trained model on both sides): mean, std, and how many seeds ``a`` won."""
    gaps = [a["per_seed"][k] - b["per_seed"][k] for k in b["per_seed"]]
    std = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    return {"mean": round(statistics.fmean(gaps), 3), "std": round(std, 3), "wins": sum(g > 0 for g in gaps)}


def default_vs_best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell: the default (timm convention, patch method pi) against the best method and patch method.

    ``within_1pt`` compares the means; ``paired`` is the per-seed gap, which the seed spread does not blur.
    """
    out = []
    for cell in dict.fromkeys(r["cell"] for r in rows):
        cands = [
            (v, m, r["patch_method"]) for r in rows if r["cell"] == cell for m, v in r["methods"].items() if "mean" in v
        ]
        best = max(cands, key=lambda c: c[0]["mean"])
        default = next(c for c in cands if c[1] == DEFAULT_METHOD and c[2] == DEFAULT_PATCH_METHOD)
        gap = round(best[0]["mean"] - default[0]["mean"], 3)
        out.append(
            {
                "cell": cell,
                "default": default[0]["mean"],
                "best": best[0]["mean"],
                "best_method": best[1],
                "best_patch_method": best[2],
                "gap": gap,
                "paired": paired_gap(best[0], default[0]),
                "within_1pt": gap <= TOLERANCE,
            }
        )
    return out


def versions() -> dict[str, str]:
    import numpy
    import sklearn
    import timm
    import torch

    import vitresize

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "vitresize": vitresize.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
    }


# ------------------------------------------------------------------------------------------------ outputs


def _fmt(v: dict[str, Any]) -> str:
    return "n/a" if "na" in v else f"{v['mean']:.1f} ± {v['std']:.1f}"


def _group_label(group: list[str]) -> str:
    label = " = ".join(group)
    return f"{label} (default)" if DEFAULT_METHOD in group else label


def table_md(res: dict[str, Any]) -> str:
    """The markdown table: rows = cells, columns = methods (byte-identical ones share a column), best in bold."""
    groups: list[list[str]] = res["method_groups"]
    src = res["source"]
    lines = [
        "# Fidelity without fine-tuning: test accuracy (%) on digits, mean ± std over seeds "
        + ", ".join(map(str, res["seeds"])),
        "",
        f"Source: {SRC_IMG} px, patch {SRC_PATCH} (grid {SRC_IMG // SRC_PATCH}), "
        f"**{src['mean']:.1f} ± {src['std']:.1f}** (no conversion). Default: method `native` (timm's convention), "
        "patch method `pi`. Methods whose conversions were byte-identical in every cell share a column. "
        "Generated by `python benchmarks/fidelity.py --update`.",
        "",
        "| cell | " + " | ".join(_group_label(g) for g in groups) + " |",
        "|---|" + "---:|" * len(groups),
    ]
    for r in res["rows"]:
        vals = [r["methods"][g[0]] for g in groups]
        top = max((v["mean"] for v in vals if "mean" in v), default=None)
        cells = [f"**{_fmt(v)}**" if "mean" in v and v["mean"] == top else _fmt(v) for v in vals]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Default against the best method and patch method per cell: the gap of the means (within 1 point?), and the "
        "gap seed by seed (mean ± std, and in how many seeds the best beat the default), which the seed spread "
        "does not blur:",
        "",
        "| cell | default | best | best method | gap | within 1 pt | paired gap | best won |",
        "|---|---:|---:|---|---:|:---:|---:|:---:|",
    ]
    n = len(res["seeds"])
    for d in res["default_vs_best"]:
        p = d["paired"]
        lines.append(
            f"| {d['cell']} | {d['default']:.1f} | {d['best']:.1f} | {d['best_method']} ({d['best_patch_method']}) "
            f"| {d['gap']:.1f} | {'yes' if d['within_1pt'] else '**no**'} | {p['mean']:.1f} ± {p['std']:.1f} "
            f"| {p['wins']}/{n} |"
        )
    return "\n".join(lines) + "\n"


def figure(res: dict[str, Any], path: Path) -> None:
    """Top: accuracy against the image size (patch 4), and at the patch / non-square cells. Bottom: each method
    minus the default, paired seed by seed (the seed spread, shared by all methods, cancels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, 2, figsize=(13, 8.6), gridspec_kw={"width_ratios": [1, 1.35], "height_ratios": [1.5, 1]}
    )
    res_rows = [r for r in res["rows"] if r["kind"] == "resolution"]
    patch_rows = [r for r in res["rows"] if r["kind"] == "patch"]
    cells = list(dict.fromkeys(r["cell"] for r in patch_rows))
    groups: list[list[str]] = res["method_groups"]
    for gi, g in enumerate(groups):
        style = _style(g, gi)
        offset = (gi - (len(groups) - 1) / 2) * 0.1
        _plot_resolution(axes[0, 0], axes[1, 0], res, res_rows, g[0], _group_label(g), style)
        _plot_patch(axes[0, 1], axes[1, 1], patch_rows, cells, g[0], offset, style)
    _decorate(axes, res, res_rows, cells)
    fig.suptitle(
        f"vitresize fidelity without fine-tuning: ViT (width {ARCH['embed_dim']}, depth {ARCH['depth']}) trained "
        f"on digits at {SRC_IMG} px / patch {SRC_PATCH}, mean ± std over {len(res['seeds'])} seeds",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _style(group: list[str], index: int) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    default = DEFAULT_METHOD in group
    return {
        "color": "black" if default else plt.get_cmap("tab10")(index % 10),
        "lw": 2.6 if default else 1.2,
        "ms": 7 if default else 5,
        "zorder": 5 if default else 2,
        "capsize": 2,
    }


def _default_row(rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in rows if r["cell"] == row["cell"] and r["patch_method"] == DEFAULT_PATCH_METHOD)


def _plot_resolution(
    ax: Any,
    ax_gap: Any,
    res: dict[str, Any],
    rows: list[dict[str, Any]],
    method: str,
    label: str,
    style: dict[str, Any],
) -> None:
    src = res["source"]
    pts = [(SRC_IMG, src["mean"], src["std"], 0.0, 0.0)]
    for r in rows:
        v = r["methods"][method]
        if "mean" in v:
            gap = paired_gap(v, r["methods"][DEFAULT_METHOD])
            pts.append((r["img_size"][0], v["mean"], v["std"], gap["mean"], gap["std"]))
    xs, ys, es, gs, gse = zip(*sorted(pts), strict=True)
    ax.errorbar(xs, ys, es, marker="o", label=label, **style)
    ax_gap.errorbar(xs, gs, gse, marker="o", **style)


def _plot_patch(
    ax: Any,
    ax_gap: Any,
    rows: list[dict[str, Any]],
    cells: list[str],
    method: str,
    offset: float,
    style: dict[str, Any],
) -> None:
    for pm, marker, fill in (("pi", "o", None), ("interp", "s", "none")):
        pts = []
        for r in rows:
            v = r["methods"][method]
            if r["patch_method"] == pm and "mean" in v:
                gap = paired_gap(v, _default_row(rows, r)["methods"][DEFAULT_METHOD])
                pts.append((cells.index(r["cell"]) + offset, v["mean"], v["std"], gap["mean"], gap["std"]))
        if not pts:
            continue
        xs, ys, es, gs, gse = zip(*pts, strict=True)
        ax.errorbar(xs, ys, es, ls="none", marker=marker, mfc=fill, **style)
        if pm == DEFAULT_PATCH_METHOD:
            ax_gap.errorbar(xs, gs, gse, ls="none", marker=marker, **style)


def _decorate(axes: Any, res: dict[str, Any], res_rows: list[dict[str, Any]], cells: list[str]) -> None:
    src = res["source"]
    sizes = sorted({SRC_IMG, *(r["img_size"][0] for r in res_rows)})
    for ax in axes[:, 0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{s}" + ("\n(source)" if s == SRC_IMG else "") for s in sizes])
        ax.minorticks_off()
    for ax in axes[:, 1]:
        ax.set_xticks(range(len(cells)), [c.replace(" (", "\n(") for c in cells], fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.axhline(src["mean"], color="grey", ls=":", lw=1)
        ax.set_ylim(0, 102)
        ax.set_ylabel("test accuracy (%)")
    for ax in axes[1]:
        ax.axhline(0, color="black", lw=2.6, zorder=4)
        ax.axhspan(-TOLERANCE, TOLERANCE, color="grey", alpha=0.15)
        ax.set_ylabel("minus the default (points)")
    axes[0, 0].set_title(f"Image size, patch {SRC_PATCH} (dotted: source accuracy)")
    axes[0, 0].legend(fontsize=7.5, loc="lower center")
    axes[0, 1].set_title("Patch size and non-square (filled circles: pi, hollow squares: interp)")
    axes[1, 0].set_title("Paired gap to the default, per seed (band: ± 1 point)", fontsize=10)
    axes[1, 1].set_title("Paired gap to the default (timm, pi), pi conversions", fontsize=10)
    axes[1, 0].set_xlabel("image size (px)")


# --------------------------------------------------------------------------------------------- comparison


def compare(new: dict[str, Any], old: dict[str, Any]) -> list[str]:
    """The cells (row / method) whose mean is off the committed one by more than the seed spread."""
    bad: list[str] = []
    if old.get("config") != new["config"]:
        return ["the training config differs from the committed one: run with --update to regenerate"]
    seeds = [str(s) for s in new["seeds"]]
    old_rows = {r["row"]: r for r in old["rows"]}
    pairs = [("source", new["source"], old["source"])]
    for r in new["rows"]:
        o = old_rows.get(r["row"], {"methods": {}})
        pairs += [(f"{r['row']} / {m}", v, o["methods"].get(m)) for m, v in r["methods"].items()]
    for name, v, o in pairs:
        if o is None:
            bad.append(f"{name}: not in the committed results")
        elif ("na" in v) != ("na" in o):
            bad.append(f"{name}: {_fmt(v)} now, {_fmt(o)} committed")
        elif "na" not in v:
            ref = statistics.fmean(o["per_seed"][s] for s in seeds)
            tol = max(2 * o["std"], TOLERANCE)
            if abs(v["mean"] - ref) > tol:
                bad.append(f"{name}: {v['mean']:.2f} now, {ref:.2f} committed (allowed ± {tol:.2f})")
    return bad


def print_summary(res: dict[str, Any]) -> None:
    print(f"\nsource accuracy ({SRC_IMG} px, patch {SRC_PATCH}): {_fmt(res['source'])}")
    print(f"{'cell':<30} {'default':>8} {'best':>6}  {'paired gap':>11}  best method")
    for d in res["default_vs_best"]:
        p = d["paired"]
        mark = "" if d["within_1pt"] else "   <- default more than 1 point below the best"
        print(
            f"{d['cell']:<30} {d['default']:>8.1f} {d['best']:>6.1f}  {p['mean']:>5.1f} ± {p['std']:<3.1f}  "
            f"{d['best_method']} ({d['best_patch_method']}), won {p['wins']}/{len(res['seeds'])}{mark}"
        )


# ------------------------------------------------------------------------------------------------- main


def _setup() -> None:
    import torch

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)  # CPU: every op used here has a deterministic kernel


def run(seeds: Sequence[int], cells: Sequence[Cell], folder: Path, reuse: bool) -> dict[str, Any]:
    from vitresize.resample.conventions import METHODS

    t_start = time.perf_counter()
    _setup()
    data = load_digits()
    ckpts: dict[int, Path] = {}
    train_s = 0.0
    with tempfile.TemporaryDirectory(prefix="vitresize-fidelity-") as tmp:
        ev = Evaluator(data, Path(tmp))
        src_acc: dict[str, float] = {}
        for seed in seeds:
            ckpts[seed], spent = checkpoint(seed, data, folder, reuse)
            train_s += spent
            src_acc[str(seed)] = ev.source(ckpts[seed])
            how = f"trained in {spent:.0f} s" if spent else "reused"
            print(f"seed {seed}: {src_acc[str(seed)]:.1f}% test accuracy at {SRC_IMG} px ({how}: {ckpts[seed]})")
        print(f"converting with {len(METHODS)} methods and evaluating:", flush=True)
        rows, groups = collect(rows_of(cells), list(METHODS), seeds, ckpts, ev)
    dvb = default_vs_best(rows)
    return {
        "description": __doc__.split("\n\n")[0] if __doc__ else "",
        "config": {"src_img": SRC_IMG, "src_patch": SRC_PATCH, "arch": ARCH, "train": TRAIN, "threads": THREADS},
        "seeds": list(seeds),
        "versions": versions(),
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "train_time_s": round(train_s, 1),
        "source": _stats(src_acc),
        "method_groups": groups,
        "rows": rows,
        "default_vs_best": dvb,
        "default_not_within_1pt": [d["cell"] for d in dvb if not d["within_1pt"]],
    }


def write(res: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    (OUT / "table.md").write_text(table_md(res))
    figure(res, OUT / "fidelity.png")


def replot() -> None:
    """Rewrite the derived parts (default vs best, table, figure) from the committed results.json."""
    path = OUT / "results.json"
    res = json.loads(path.read_text())
    res["default_vs_best"] = default_vs_best(res["rows"])
    res["default_not_within_1pt"] = [d["cell"] for d in res["default_vs_best"] if not d["within_1pt"]]
    write(res)
    print_summary(res)
    print(f"rewrote {OUT.relative_to(ROOT)}/results.json, table.md, fidelity.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--update", action="store_true", help="rewrite benchmarks/fidelity/ instead of comparing")
    ap.add_argument("--quick", action="store_true", help="1 seed, 4 cells (a smoke run; compared, never written)")
    ap.add_argument("--reuse", action="store_true", help="reuse trained checkpoints of the same config if cached")
    ap.add_argument("--replot", action="store_true", help="only redraw table.md and fidelity.png from results.json")
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("VITRESIZE_FIDELITY_DIR", "~/.cache/vitresize-fidelity")),
        help="where the trained checkpoints go",
    )
    a = ap.parse_args()
    if a.replot:
        replot()
        return
    if a.quick and a.update:
        ap.error("--quick results are not written: drop --quick to --update")
    seeds = SEEDS[:1] if a.quick else SEEDS
    cells = [c for c in CELLS if c.name in QUICK_CELLS] if a.quick else CELLS
    print(f"machine: {os.cpu_count()} cores (using {THREADS} threads), Python {sys.version.split()[0]}", flush=True)
    res = run(seeds, cells, a.dir.expanduser(), a.reuse)
    print_summary(res)
    print(f"wall time {res['wall_time_s']:.0f} s (training {res['train_time_s']:.0f} s)")
    if a.update:
        write(res)
        print(f"wrote {OUT.relative_to(ROOT)}/results.json, table.md, fidelity.png")
        return
    committed = OUT / "results.json"
    if not committed.exists():
        sys.exit(f"no committed results at {committed}: run with --update to create them")
    bad = compare(res, json.loads(committed.read_text()))
    if bad:
        print(f"NOT reproduced within the seed spread ({len(bad)} cells):")
        for line in bad:
            print(f"  {line}")
        sys.exit(1)
    print("reproduced within the seed spread")


if __name__ == "__main__":
    main()
