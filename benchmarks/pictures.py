"""``make pictures``: the README's example pictures, one per command, from a real trained model.

The fidelity benchmark's ViT (seed 0, trained on scikit-learn's digits at 32 px, patch 4; trained now unless
``benchmarks/fidelity.py`` has cached it) is saved as a timm hub folder (``config.json`` names its
architecture, so ``check`` builds it with its true head count), then:

- ``vitresize inspect SRC --plot docs/img/inspect.png``
- ``vitresize convert SRC OUT --img-size 64 --plot docs/img/convert.png``
- ``vitresize check SRC OUT --images DIGITS --methods all --plot docs/img/check.png`` on 200 test digits.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMG = ROOT / "docs" / "img"
sys.path.insert(0, str(HERE))

import fidelity  # noqa: E402


def _hub_folder(weights: Path, out: Path) -> None:
    from safetensors.torch import load_file
    from timm.models._hub import save_for_hf

    model = fidelity.build_model((fidelity.SRC_IMG, fidelity.SRC_IMG), fidelity.SRC_PATCH)
    model.load_state_dict(load_file(str(weights)))
    args = {"img_size": fidelity.SRC_IMG, "patch_size": fidelity.SRC_PATCH, "num_classes": 10, **fidelity.ARCH}
    save_for_hf(model, out, model_args=args, safe_serialization=True)


def _digits(data: fidelity.Digits, out: Path, n: int) -> None:
    from PIL import Image

    out.mkdir()
    for i in range(n):
        pixels = (data.x_test[i].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(pixels).save(out / f"digit_{i:03d}_label_{int(data.y_test[i])}.png")


def _vitresize(*args: object) -> None:
    cmd = [str(Path(sys.executable).parent / "vitresize"), *map(str, args)]
    print("$", " ".join(cmd[1:]).replace(str(ROOT) + "/", ""), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200, help="test digits to check on")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("VITRESIZE_FIDELITY_DIR", "~/.cache/vitresize-fidelity")),
        help="where the fidelity benchmark keeps its trained checkpoints",
    )
    a = ap.parse_args()
    fidelity._setup()
    data = fidelity.load_digits()
    weights, _ = fidelity.checkpoint(0, data, a.cache.expanduser(), reuse=True)
    IMG.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, out, digits = Path(tmp) / "digits_vit", Path(tmp) / "digits_vit_64", Path(tmp) / "digits"
        _hub_folder(weights, src)
        _digits(data, digits, a.images)
        _vitresize("inspect", src, "--plot", IMG / "inspect.png")
        _vitresize("convert", src, out, "--img-size", "64", "--plot", IMG / "convert.png")
        _vitresize("check", src, out, "--images", digits, "--methods", "all", "--plot", IMG / "check.png")


if __name__ == "__main__":
    main()
