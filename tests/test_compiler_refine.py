"""Sequential refinement (compiler.refine): exact where the structure is exact, never worse per linear, closer
to the dense model end to end on the calibration text, and resumable."""

from __future__ import annotations

import pytest
import torch

import procrustes_onnx.compiler.refine as refine_mod
from procrustes_onnx.compiler.compress import compress_model
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.testing import relative_error, tiny_compression_config, tiny_model

CALIB = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def cfg(**kw):
    return tiny_compression_config(**{"preset": "5/8", "iterations": 3, "rotation_iters": 10, "calib_samples": 8,
                                      "calib_seq_len": 64, **kw})


rel = relative_error


def _compress(arch: str, tmp_path, name: str, records: list | None = None, **kw):
    model = tiny_model(arch, dtype=torch.float64)
    if records is not None:
        real = refine_mod.refine_sequential

        def spy(*a, **k):
            out = real(*a, **k)
            records.extend(out)
            return out
        refine_mod.refine_sequential = spy
    try:
        compress_model(model, None, cfg(**kw), tmp_path / name, progress=False, echo=lambda s: None,
                       calib_tokens=CALIB)
    finally:
        if records is not None:
            refine_mod.refine_sequential = real
    return model


@torch.no_grad()
@pytest.mark.parametrize("arch,rotation", [("llama", "global"), ("opt", "per-position")])
def test_refine_keeps_exact_structures_exact(tmp_path, arch, rotation):
    dense = tiny_model(arch, dtype=torch.float64)
    ref = dense(IDS).logits
    model = _compress(arch, tmp_path, "a", preset="full", rotation=rotation, refine="corrected")
    assert rel(model(IDS).logits, ref) < 1e-6


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_refine_moves_compressed_model_towards_dense(tmp_path, arch):
    windows = CALIB[: 8 * 64].reshape(8, 64)
    ref = tiny_model(arch, dtype=torch.float64)(windows).logits
    errors = {}
    for mode in ("none", "sequential", "corrected"):
        records: list = []
        model = _compress(arch, tmp_path, mode, records if mode != "none" else None, refine=mode)
        errors[mode] = rel(model(windows).logits, ref)
        if mode != "none":
            assert records and all(r["rel_after"] <= r["rel_before"] + 1e-12 for r in records)
            assert any(r["kept"] for r in records)
    assert errors["corrected"] < errors["none"]
    assert errors["sequential"] < errors["none"] * 1.05


@torch.no_grad()
def test_refine_resumes_after_kill(tmp_path, monkeypatch):
    full = _compress("llama", tmp_path, "a", refine="corrected")
    real = refine_mod.project_weighted
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # layer 0 (six compressed linears) is checkpointed, layer 1 is not
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(refine_mod, "project_weighted", dying)
    with pytest.raises(KeyboardInterrupt):
        _compress("llama", tmp_path, "b", refine="corrected")
    assert [p.name for p in (tmp_path / "b").glob("refine*.safetensors")] == ["refine000.safetensors"]
    monkeypatch.setattr(refine_mod, "project_weighted", real)
    resumed = _compress("llama", tmp_path, "b", refine="corrected")
    assert torch.equal(resumed(IDS).logits, full(IDS).logits)


def test_refine_needs_calibration():
    with pytest.raises(UserError, match="--method weighted"):
        cfg(method="frobenius", refine="sequential")
    with pytest.raises(UserError, match="compress-embeddings"):
        cfg(kept={"embed": 0.5})          # the embedding's kept share needs the option itself
