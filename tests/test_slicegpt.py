"""SliceGPT baseline on tiny models: exact at full width, better than random slicing, removed fraction as asked."""

from __future__ import annotations

import pytest
import torch

from procrustes_onnx.compiler.checkpoint import load_compressed, save_compressed
from procrustes_onnx.compiler.rotation import random_orthogonal, rotate_per_position
from procrustes_onnx.compiler.fusion import fuse_norms
from procrustes_onnx.compiler.skips import Shortcut, install_shortcuts, stored_parameter_count
from procrustes_onnx.compiler.slicegpt import pca_basis, slice_model, sliced_parameter_count
from procrustes_onnx.testing import tiny_model

WINDOWS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_pca_basis_finds_the_principal_direction() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(500, 1, generator=g, dtype=torch.float64)
    x = t * torch.tensor([[3.0, 3.0]], dtype=torch.float64) + 0.1 * torch.randn(500, 2, generator=g, dtype=torch.float64)
    q = pca_basis(x.T @ x)
    assert abs(abs(float(q[0, 0] + q[1, 0])) / 2 ** 0.5 - 1) < 1e-3     # first column ~ +-(1, 1)/sqrt(2)
    assert torch.allclose(q.T @ q, torch.eye(2, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_full_width_is_exact(arch: str) -> None:
    model = tiny_model(arch, dtype=torch.float64)
    ref = _logits(model)
    report = slice_model(model, WINDOWS, dim=64)
    assert report["dim"] == 64
    assert _rel(_logits(model), ref) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_slicing_removes_the_asked_fraction_and_beats_random(arch: str) -> None:
    model = tiny_model(arch)
    ref = _logits(model)
    report = slice_model(model, WINDOWS, ratio=0.2)
    assert report["params"] == stored_parameter_count(model)
    assert 0.2 <= report["removed"] < 0.23                     # one width step on d=64 is ~2% of the model
    assert all(m.weight.shape == (report["dim"], report["dim"]) for m in model.modules() if isinstance(m, Shortcut))
    out = _logits(model)
    assert torch.isfinite(out).all()
    # the same width from random rotations instead of PCA is much worse
    rand = fuse_norms(tiny_model(arch))
    install_shortcuts(rand)
    qs = [random_orthogonal(64, seed=p)[:, :report["dim"]] for p in range(5)]
    rotate_per_position(rand, qs)
    assert _rel(out, ref) < 0.8 * _rel(_logits(rand), ref)


def test_width_search_matches_the_sliced_model() -> None:
    model = fuse_norms(tiny_model("qwen2"))
    install_shortcuts(model)
    predicted = sliced_parameter_count(model, 40)
    slice_model(model, WINDOWS, dim=40)
    assert stored_parameter_count(model) == predicted


def test_sliced_checkpoint_round_trip(tmp_path) -> None:
    model = tiny_model("opt")
    slice_model(model, WINDOWS, ratio=0.25)
    ref = _logits(model)
    loaded, _ = load_compressed(save_compressed(model, tmp_path / "ck"))
    assert _rel(_logits(loaded), ref) < 1e-6
    assert stored_parameter_count(loaded) == stored_parameter_count(model)
    assert loaded.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)
