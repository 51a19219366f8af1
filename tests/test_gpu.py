"""The CUDA path gives the CPU result (to 1e-5). Skipped where CUDA is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fixture, load_any

import vitresize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
]


@pytest.mark.parametrize(
    "name", ["timm_vit_cls.pth", "deit_distilled.pth", "timm_vit_bf16.safetensors", "torchvision_vit.pth"]
)
def test_cuda_matches_cpu(tmp_path: Path, name: str) -> None:
    cpu, gpu = tmp_path / "cpu.safetensors", tmp_path / "gpu.safetensors"
    vitresize.convert(fixture(name), cpu, img_size=48, patch=12, device="cpu")
    vitresize.convert(fixture(name), gpu, img_size=48, patch=12, device="cuda")
    a, b = load_any(cpu), load_any(gpu)
    assert a.keys() == b.keys()
    for k in a:
        tol = 1e-5 if a[k].dtype == torch.float32 else 1e-2
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=tol, rtol=0)


@pytest.mark.parametrize(
    "name", ["timm_vit_cls.pth", "torchvision_vit.pth", "families/hf_vit", "families/open_clip.pth"]
)
def test_check_on_cuda_agrees_with_cpu(tmp_path: Path, name: str) -> None:
    """``check --device cuda`` runs every library's model on the GPU and scores as on the CPU."""
    src = fixture(name)
    dst = tmp_path / (src.name if src.is_dir() else f"out{src.suffix}")
    vitresize.convert(src, dst, img_size=48)
    cpu = vitresize.check(src, dst, limit=8, device="cpu")
    gpu = vitresize.check(src, dst, limit=8, device="cuda")
    assert gpu.ok and cpu.ok
    a, b = cpu.candidates[0].scores, gpu.candidates[0].scores
    assert a is not None and b is not None
    assert abs(a.cosine_pooled - b.cosine_pooled) < 1e-3 and abs(a.cosine_patch - b.cosine_patch) < 1e-3
