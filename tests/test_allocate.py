"""Measured allocation and --max-loss on tiny models: the budget is met exactly, the shipped model never
breaks the loss budget on the held-out text it was measured on, and --max-loss 0 returns the dense model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from procrustes_onnx.compiler.allocate import (Ladder, Option, allocate, choice_after, greedy_steps, heldout_nll,
                                               search_max_loss)
from procrustes_onnx.compiler.calibration import calibration_split, collect_curvature, collect_grams
from procrustes_onnx.compiler.checkpoint import load_compressed
from procrustes_onnx.compiler.compress import compress, plan_for_model, rotate_solved, saved_param_count
from procrustes_onnx.compiler.config import CompressionConfig
from procrustes_onnx.compiler.fusion import fuse_norms
from procrustes_onnx.compiler.positions import residual_positions
from procrustes_onnx.compiler.solve import gram_paths, rotated_input_grams
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.ops import StructuredLinear
from procrustes_onnx.testing import tiny_compression_config, tiny_model

CALIB = torch.randint(0, 256, (6000,), generator=torch.Generator().manual_seed(2))


def _ladder(points: list[tuple[int, float]], name: str = "m") -> Ladder:
    opts = [Option(None if i == 0 else {"kind": "gs", "i": i}, p, price, label=str(i))
            for i, (p, price) in enumerate(points)]
    return Ladder(name, "q", 0, (8, 8), "in", opts)


def test_hull_drops_dominated_and_non_convex_options():
    lad = _ladder([(100, 0.0), (80, 5.0), (60, 1.0), (40, 3.0), (30, 9.0), (20, 4.0)])
    hull = lad.hull()
    assert [o.params for o in hull] == [100, 60, 20]   # 80 is dominated by 60; 40 and 30 lie above the hull
    slopes = [(b.price - a.price) / (a.params - b.params) for a, b in zip(hull, hull[1:])]
    assert slopes == sorted(slopes)


def test_greedy_takes_cheapest_loss_per_parameter_and_meets_the_budget():
    a = _ladder([(100, 0.0), (50, 1.0), (10, 10.0)], "a")
    b = _ladder([(100, 0.0), (50, 5.0)], "b")
    steps = greedy_steps([a, b])
    assert [(i, o.params) for i, o in steps] == [(0, 50), (1, 50), (0, 10)]
    for budget in (200, 150, 149, 100, 60):
        choice, n = allocate([a, b], steps, budget)
        stored = sum(o.params for o in choice)
        assert stored <= budget
        if n:  # the fewest steps: one step less would not fit
            assert sum(o.params for o in choice_after([a, b], steps, n - 1)) > budget
    with pytest.raises(UserError, match="cannot store"):
        allocate([a, b], steps, 59)


def test_max_loss_search_returns_the_largest_prefix_within_the_limit():
    lads = [_ladder([(100, 0.0), (50, 1.0), (10, 2.0)], str(i)) for i in range(3)]
    steps = greedy_steps(lads)
    loss_of = lambda choice: sum(o.price for o in choice)           # a score that rises with every step
    n, score, probes = search_max_loss(lads, steps, 3.5, loss_of, echo=lambda s: None)
    assert score is not None and score <= 3.5
    assert n == len(steps) or loss_of(choice_after(lads, steps, n + 1)) > 3.5
    assert search_max_loss(lads, steps, -1.0, loss_of, echo=lambda s: None)[:2] == (0, None)


def test_curvature_statistics_are_token_means_and_leave_parameters_as_they_were():
    model = tiny_model("llama")
    windows = CALIB[:4 * 32].reshape(4, 32)
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    flags = [p.requires_grad for p in model.parameters()]
    c, g = collect_curvature(model, windows, paths, progress=False)
    c2, g2 = collect_curvature(model, torch.cat([windows, windows]), paths, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    grams = collect_grams(model, windows, paths, progress=False)
    for p in paths:
        assert torch.allclose(c[p], grams[p], rtol=1e-10, atol=1e-12)      # the same Gram as the solver's
        assert torch.allclose(c2[p], c[p], rtol=1e-10) and torch.allclose(g2[p], g[p], rtol=1e-8)
        assert torch.allclose(g[p], g[p].T) and torch.linalg.eigvalsh(g[p]).min() > -1e-10 * g[p].diag().max()
        assert g[p].diag().sum() > 0


@pytest.mark.parametrize("rotation", ["global", "per-position"])
def test_rotated_solver_grams_are_the_rotated_models_input_grams(rotation):
    """The ladder prices with the solver's Grams carried into the rotated basis instead of a second pass."""
    model = tiny_model("llama")
    windows = CALIB[:4 * 32].reshape(4, 32)
    fuse_norms(model)
    config = tiny_compression_config(rotation=rotation)
    plan = plan_for_model(model, config, sum(p.numel() for p in model.parameters()))
    specs = {e.path: e.spec for e in plan.entries}
    positions = residual_positions(model)
    grams = collect_grams(model, windows, gram_paths(positions, specs), progress=False)
    gen = torch.Generator().manual_seed(5)
    d = model.config.hidden_size
    qs = [torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
          for _ in (positions[:1] if rotation == "global" else positions)]
    rs = qs * len(positions) if rotation == "global" else qs
    carried = rotated_input_grams(positions, specs, grams, rs)
    rotate_solved(model, rs, rotation)
    direct, _ = collect_curvature(model, windows, list(specs), progress=False)
    assert set(carried) == set(specs)
    for path in specs:
        rel = float((carried[path] - direct[path]).norm() / direct[path].norm())
        assert rel < 1e-6, (path, rel)      # the rotated model runs in float32: its own Grams carry ~1e-7


def _measured(tmp_path, **kw):
    lines: list[str] = []
    model = tiny_model("llama")
    out = compress(model, None, tiny_compression_config(**kw), tmp_path / "ck", progress=False, echo=lines.append,
                   calib_tokens=CALIB)
    extra = json.loads((out / "config.json").read_text())["procrustes"]
    return model, out, extra, lines


@pytest.mark.parametrize("structure,rotation", [("gs", "global"), ("kron", "per-position")])
def test_measured_allocation_keeps_the_promise_and_never_ships_worse_than_uniform(tmp_path, structure, rotation):
    model, out, extra, lines = _measured(tmp_path, ratio=0.15, preset=None, structure=structure, rotation=rotation,
                                         allocation="measured")
    alloc = extra["allocation"]
    assert extra["promised_params"] == saved_param_count(out)
    assert alloc["heldout_nll"] <= alloc["uniform_heldout_nll"]
    assert alloc["shipped"] in ("measured", "uniform") and any("plan ships" in s for s in lines)
    # the measured plan stores no more than the uniform one (whose removal is the target's nearest)
    assert alloc["removed"] >= 0.15 - 0.02
    loaded, _ = load_compressed(out)
    ids = CALIB[:24].reshape(2, 12)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def _sharp_model_and_text():
    """A tiny model with peaked predictions and 64-token sequences sampled from it (the held-out windows
    are whole sequences): on that text the dense model is the best one in expectation."""
    model = tiny_model("llama", tie=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(3.0)
    torch.manual_seed(0)
    ids = model.generate(torch.zeros((64, 1), dtype=torch.long), do_sample=True, max_new_tokens=63,
                         min_new_tokens=63, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)
    return model, ids.flatten()


SHARP = dict(ratio=None, preset=None, structure="gs", calib_samples=4, calib_seq_len=64, heldout_samples=32)


def test_max_loss_model_stays_within_its_budget_on_the_held_out_text(tmp_path):
    model, text = _sharp_model_and_text()
    out = compress(model, None, tiny_compression_config(max_loss=0.1, **SHARP), tmp_path / "ck", progress=False,
                   echo=lambda s: None, calib_tokens=text)
    extra = json.loads((out / "config.json").read_text())["procrustes"]
    alloc = extra["allocation"]
    assert extra["removed"] > 0.05 and extra["promised_params"] == saved_param_count(out)
    assert math.isclose(alloc["limit_nll"], alloc["dense_heldout_nll"] + math.log(1.1), rel_tol=1e-12)
    # some probe broke the budget, so the search had something to refuse
    assert any(p["heldout_nll"] > alloc["limit_nll"] for p in alloc["probes"])
    _, held = calibration_split(None, CompressionConfig.from_dict(extra["compression"]), text)
    loaded, _ = load_compressed(out)
    assert heldout_nll(loaded, held) <= alloc["limit_nll"] + 1e-6


def test_unreachable_max_loss_returns_the_dense_model_with_a_message(tmp_path, monkeypatch):
    import procrustes_onnx.compiler.allocate as allocate_mod

    real = allocate_mod.heldout_nll

    def strict(model, windows, batch_size=4):  # every compressed model scores above dense: nothing fits
        return real(model, windows, batch_size) + any(isinstance(m, StructuredLinear) for m in model.modules())

    monkeypatch.setattr(allocate_mod, "heldout_nll", strict)
    model, text = _sharp_model_and_text()
    ids = text[:64].reshape(1, 64)
    with torch.no_grad():
        before = model(ids).logits
    lines: list[str] = []
    out = compress(model, None, tiny_compression_config(max_loss=0.0, **SHARP), tmp_path / "ck", progress=False,
                   echo=lines.append, calib_tokens=text)
    extra = json.loads((out / "config.json").read_text())["procrustes"]
    assert extra["allocation"]["steps"] == 0 and abs(extra["removed"]) < 0.01   # norms folded, nothing else
    assert not any(isinstance(m, StructuredLinear) for m in model.modules())
    assert any("the dense model is returned (every linear dense" in s for s in lines)
    loaded, _ = load_compressed(out)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, before, atol=1e-4)  # rotated, fused, but the same function


def test_max_loss_settings_are_checked():
    with pytest.raises(UserError, match="both given"):
        CompressionConfig(max_loss=0.1, ratio=0.2)
    with pytest.raises(UserError, match="needs calibration statistics"):
        CompressionConfig(max_loss=0.1, ratio=None, method="frobenius")
    with pytest.raises(UserError, match="outside"):
        CompressionConfig(max_loss=-1.0, ratio=None)
    cfg = CompressionConfig(max_loss=0.1, ratio=None)
    assert cfg.measured and cfg.plan_ratio == 0.1
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg


def test_ladder_keeps_the_plans_kronecker_split():
    from procrustes_onnx.compiler.allocate import _ladder_specs
    from procrustes_onnx.ops.planner import kron_spec

    for split in ("in", "out"):
        uniform = kron_spec(160, 64, split, 0.75, 8)
        specs = [s for _, s in _ladder_specs((160, 64), uniform, 8, split)]
        assert specs and all(s["a_shape"] == uniform["a_shape"] for s in specs)
        assert sorted(s["rank"] for s in specs) == [r for r in range(1, 8) if r != uniform["rank"]]
