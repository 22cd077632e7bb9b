"""Weighted stage (compiler.weighted): exact loss algebra, monotone rotation solve, beats Frobenius."""

from __future__ import annotations

import pytest
import torch

from procrustes_onnx.compiler.procrustes import frobenius_als
from procrustes_onnx.compiler.weighted import (WeightedTerm, _f_and_grad, _quadratic_parts, balance_weights,
                                               solve_rotation, weighted_loss, weighted_stage)


def lowrank(r: int):
    def proj(m):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return (u[:, :r] * s[:r]) @ vh[:r]
    return proj


def weighted_lowrank(r: int):
    """Exact weighted rank-r projection: X^{-1} trunc_r(X M) with X = C^{1/2}."""
    def proj(m, c):
        ev, v = torch.linalg.eigh(c)
        x = (v * ev.clamp_min(1e-12).sqrt()) @ v.T
        xi = (v / ev.clamp_min(1e-12).sqrt()) @ v.T
        return xi @ lowrank(r)(x @ m)
    return proj


def slab(q: int, r: int):
    """Kronecker class split on the hidden side (rows of an 'in' term, columns of an 'out' term);
    not rotation invariant, unlike plain low rank. Projected in the Frobenius norm (the weighted
    stage keeps a candidate only if it lowers the loss, so an inexact projection is allowed)."""
    def proj(m, c=None, hidden_rows=True):
        mm = m if hidden_rows else m.T
        d, n = mm.shape
        u, s, vh = torch.linalg.svd(mm.reshape(q, (d // q) * n), full_matrices=False)
        out = ((u[:, :r] * s[:r]) @ vh[:r]).reshape(d, n)
        return out if hidden_rows else out.T
    return proj


def gram(n: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    scales = torch.logspace(0, -1.5, n, dtype=torch.float64)  # anisotropic activations
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) * scales
    return x.T @ x / tokens


def make_terms(gen, d=24, n_ff=40, rank=6, cls="lowrank"):
    c_in = gram(d, 200, gen)
    c_out = gram(n_ff, 200, gen)
    w_out = torch.randn(n_ff, d, generator=gen, dtype=torch.float64)   # a "down" writing the position
    w_q = torch.randn(d, 16, generator=gen, dtype=torch.float64)       # two readers sharing one Gram
    w_up = torch.randn(d, n_ff, generator=gen, dtype=torch.float64)
    if cls == "lowrank":
        p_out = p_in = weighted_lowrank(rank)
    else:
        p_out, p_in = (lambda m, c: slab(4, 2)(m, hidden_rows=False)), slab(4, 2)
    return [WeightedTerm(w_out, c_out, p_out, "out", name="down"),
            WeightedTerm(w_q, c_in, p_in, "in", name="q"),
            WeightedTerm(w_up, c_in, p_in, "in", name="up")]


def test_closed_form_matches_loss_and_gradient():
    gen = torch.Generator().manual_seed(0)
    terms = make_terms(gen)
    balance_weights(terms, "relative")
    r = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64))[0]
    approx = [t.project(*t.target(r)) for t in terms]
    g, quads, const = _quadratic_parts(terms, approx)
    assert len(quads) == 1  # q and up share their Gram matrix
    f, e = _f_and_grad(r, g, quads, const)
    assert f == pytest.approx(weighted_loss(terms, r, approx), rel=1e-10)
    step = torch.randn(24, 24, generator=gen, dtype=torch.float64) * 1e-6
    f2, _ = _f_and_grad(r + step, g, quads, const)
    assert (f2 - f) == pytest.approx(float((e * step).sum()), rel=1e-4)


def test_rotation_solve_is_monotone_and_orthogonal():
    gen = torch.Generator().manual_seed(1)
    terms = make_terms(gen, cls="slab")
    balance_weights(terms, "paper")
    eye = torch.eye(24, dtype=torch.float64)
    approx = [t.project(*t.target(eye)) for t in terms]
    r, trace = solve_rotation(terms, approx, eye, iters=100)
    t = torch.tensor(trace)
    assert torch.all(t[1:] <= t[:-1] + 1e-12 * abs(t[0]))
    assert trace[-1] < 0.99 * trace[0]
    assert torch.allclose(r.T @ r, eye, atol=1e-10)
    assert weighted_loss(terms, r, approx) == pytest.approx(trace[-1], rel=1e-8)


def test_weighted_stage_beats_frobenius_stage():
    gen = torch.Generator().manual_seed(2)
    terms = make_terms(gen, cls="slab")
    balance_weights(terms, "relative")
    # Frobenius stage on the stacked orientation (outputs transposed), then map to model orientation
    stacked = [t.weight.T if t.kind == "out" else t.weight for t in terms]
    fro = frobenius_als(stacked, [slab(4, 2)] * 3, iters=50)
    r_f = fro.q.T
    approx_f = [p.T if t.kind == "out" else p for t, p in zip(terms, fro.projections)]
    loss_f = weighted_loss(terms, r_f, approx_f)
    res = weighted_stage(terms, r_f, approx_f, outer_iters=3, rotation_iters=200)
    assert res.loss[0] == pytest.approx(loss_f, rel=1e-10)
    assert all(b <= a * (1 + 1e-10) for a, b in zip(res.loss, res.loss[1:])), res.loss
    assert res.loss[-1] < 0.8 * loss_f, (loss_f, res.loss)
    assert weighted_loss(terms, res.r, res.approx) == pytest.approx(res.loss[-1], rel=1e-10)


def test_full_rank_weighted_is_lossless_and_bad_kind_raises():
    gen = torch.Generator().manual_seed(3)
    terms = make_terms(gen, rank=24)
    res = weighted_stage(terms, outer_iters=1, rotation_iters=20)
    scale = sum(float((t.weight * (t.gram @ t.weight)).sum()) for t in terms)
    assert res.loss[-1] <= 1e-18 * scale
    with pytest.raises(ValueError):
        WeightedTerm(terms[0].weight, terms[0].gram, terms[0].project, "sideways")


@pytest.mark.parametrize("shape,side", [((48, 20), "in"), ((20, 48), "out")])
def test_weighted_kron_is_ops_projection_and_beats_frobenius(shape, side):
    """project_weighted is ops' weighted projection (one algorithm, issue 17), and on the paper's slab
    shapes it clearly beats the Frobenius start."""
    from procrustes_onnx.ops.planner import kron_spec
    from procrustes_onnx.compiler.weighted import project_weighted
    from procrustes_onnx.ops import project_factors, structured_from_spec, weighted_sq_error
    gen = torch.Generator().manual_seed(5)
    m = torch.randn(*shape, generator=gen, dtype=torch.float64)
    c = gram(shape[0], 300, gen)
    spec = kron_spec(*shape, side, 0.5)

    def err(f):
        return weighted_sq_error(m, structured_from_spec(spec, f, dtype=torch.float64).materialize(), c)

    mine = project_weighted(m, c, spec, sweeps=4)
    ops = project_factors(m, spec, gram=c, sweeps=4)
    assert all(torch.equal(mine[k], ops[k]) for k in ops)
    fro = err(project_factors(m, spec))
    assert err(mine) <= fro * (1 + 1e-12)
    assert err(mine) < 0.97 * fro


def test_projector_keeps_the_factors_of_every_live_result_and_frees_dropped_ones():
    """The solver may keep an earlier iterate than a projection's latest: its factors must still be found
    (no re-projection, which would give the rejected candidate), and a dropped result must not stay in memory."""
    import gc

    from procrustes_onnx.compiler.solve import Projector
    from procrustes_onnx.ops import structured_from_spec

    spec = {"kind": "gs", "left": [2, 8, 4], "right": [2, 4, 6], "in": 16, "out": 12}
    g = torch.Generator().manual_seed(0)
    gram = torch.eye(16, dtype=torch.float64)
    projector = Projector()
    proj = projector.weighted("layer.up", spec)
    first = proj(torch.randn(16, 12, generator=g, dtype=torch.float64), gram)
    second = proj(torch.randn(16, 12, generator=g, dtype=torch.float64), gram)
    for dense in (first, second):
        fac = projector.factors_of(dense)
        rebuilt = structured_from_spec(spec, fac, dtype=torch.float64).materialize()
        assert torch.allclose(rebuilt, dense, rtol=0, atol=1e-12)
    del second, dense
    gc.collect()
    assert len(projector.known) == 1 and projector.factors_of(first) is not None
