"""Projections onto Kronecker sums and GS matrices: Eckart-Young optimality, idempotence, weighted <= plain."""

import pytest
import torch

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.ops import (GSMatrix, KroneckerSum, gs_discarded_sq, gs_materialize, kron_materialize,
                                 kron_rearrange, project_gs, project_gs_weighted, project_kronecker,
                                 project_kronecker_weighted, project_to_spec, projection_error, weighted_sq_error)
from procrustes_onnx.ops.linalg import gram_svd, torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Small float64 solves: 1 thread avoids OpenMP stalls on a shared machine (see torch_threads)."""
    with torch_threads(1):
        yield


F64 = torch.float64
# (rank, a_shape, b_shape): the paper's input-side (q x 1) and output-side (1 x q) splits, and general ones
KRON = [(3, (4, 1), (12, 20)), (3, (1, 4), (20, 12)), (5, (8, 1), (6, 10)), (2, (3, 2), (4, 5)), (1, (2, 2), (3, 3))]
GS = [(4, 12, 12, 2, 24, 24), (2, 24, 24, 4, 12, 12), (4, 12, 9, 2, 18, 40), (4, 6, 10, 8, 5, 3), (3, 4, 5, 5, 3, 2)]


def _gram(n: int, seed: int, tokens: int = 400) -> torch.Tensor:
    """An anisotropic calibration Gram matrix like real activations (a few large directions)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=F64) * torch.logspace(0, -2, n, dtype=F64)
    x = x @ torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    return x.T @ x / tokens


def _rand(shape, seed, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("rank,a_shape,b_shape", KRON)
def test_kron_eckart_young(rank, a_shape, b_shape):
    m = _rand((a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]), 0)
    a, b = project_kronecker(m, rank, a_shape, b_shape)
    assert a.shape == (rank, *a_shape) and b.shape == (rank, *b_shape)
    err = ((m - kron_materialize(a, b)) ** 2).sum()
    s = torch.linalg.svdvals(kron_rearrange(m, a_shape, b_shape))
    assert abs(err - (s[rank:] ** 2).sum()) <= 1e-9 * (s ** 2).sum()


@pytest.mark.parametrize("rank,a_shape,b_shape", KRON)
def test_kron_idempotent_and_batched(rank, a_shape, b_shape):
    w = kron_materialize(_rand((2, rank, *a_shape), 1), _rand((2, rank, *b_shape), 2))   # batch of 2
    a, b = project_kronecker(w, rank, a_shape, b_shape)
    assert a.shape == (2, rank, *a_shape)
    assert ((kron_materialize(a, b) - w).norm() / w.norm()) < 1e-10


@pytest.mark.parametrize("shape", GS)
def test_gs_eckart_young_and_idempotent(shape):
    kl, bl1, bl2, kr, br1, br2 = shape
    m = _rand((kl * bl1, kr * br2), 3)
    left, right = project_gs(m, *shape)
    assert left.shape == (kl, bl1, bl2) and right.shape == (kr, br1, br2)
    err = ((m - gs_materialize(left, right)) ** 2).sum()
    assert abs(err - gs_discarded_sq(m, *shape)) <= 1e-9 * (m ** 2).sum()
    w = gs_materialize(_rand((kl, bl1, bl2), 4), _rand((kr, br1, br2), 5))
    l2, r2 = project_gs(w, *shape)
    assert ((gs_materialize(l2, r2) - w).norm() / w.norm()) < 1e-10


@pytest.mark.parametrize("shape", [(3, 12, 40), (3, 40, 12), (7, 7)])
def test_gram_svd_is_the_truncated_svd(shape):
    """Each factor pair's product is the rank-k SVD truncation (to rounding), on wide, tall and rank-deficient
    blocks; singular values agree with LAPACK's and dead directions come back as zeros, not NaNs."""
    b = _rand(shape, 11)
    b[..., -1, :] = 0.0                                   # a zero row: rank-deficient
    k = min(shape[-2:]) - 2
    left, s, right = gram_svd(b, k)
    u, s_ref, vh = torch.linalg.svd(b, full_matrices=False)
    best = (u[..., :k] * s_ref[..., None, :k]) @ vh[..., :k, :]
    assert float((left @ right - best).norm() / best.norm()) < 1e-10
    assert torch.allclose(s, s_ref[..., :k], rtol=1e-10, atol=1e-12)
    full_left, _, full_right = gram_svd(b, min(shape[-2:]))
    assert torch.isfinite(full_left).all() and torch.isfinite(full_right).all()
    assert float((full_left @ full_right - b).norm() / b.norm()) < 1e-10


def test_projection_keeps_input_dtype():
    m = _rand((48, 20), 6, torch.float32)
    a, b = project_kronecker(m, 3, (4, 1), (12, 20))
    left, right = project_gs(m, 4, 12, 12, 2, 24, 10)
    assert {a.dtype, b.dtype, left.dtype, right.dtype} == {torch.float32}


@pytest.mark.parametrize("rank,a_shape,b_shape", KRON)
def test_kron_weighted_never_worse(rank, a_shape, b_shape):
    m = _rand((a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]), 7)
    c = _gram(m.shape[0], 8)
    w0 = kron_materialize(*project_kronecker(m, rank, a_shape, b_shape))
    w1 = kron_materialize(*project_kronecker_weighted(m, c, rank, a_shape, b_shape))
    e0, e1 = weighted_sq_error(m, w0, c), weighted_sq_error(m, w1, c)
    assert e1 <= e0 * (1 + 1e-12)
    if a_shape[0] > 1:   # the row weighting can act on a: expect a real gain on an anisotropic gram
        assert e1 < 0.8 * e0


@pytest.mark.parametrize("rank,a_shape,b_shape", KRON + [(2, (6, 4), (1, 5))])
def test_kron_weighted_half_steps_are_exact(rank, a_shape, b_shape):
    """Each ALS half-step (either GEMM order, or the plain step where C cancels) is the weighted
    least-squares optimum, checked against a dense solve over vec(factor)."""
    from procrustes_onnx.ops.project_kron import _ls_step, _mirror
    (m1, n1), (m2, n2) = a_shape, b_shape
    m = _rand((m1 * m2, n1 * n2), 20)
    c = _gram(m.shape[0], 21)
    root = torch.linalg.cholesky(c).T                       # ||root E||^2 = tr(E^T C E)
    a, b = _rand((rank, *a_shape), 22), _rand((rank, *b_shape), 23)
    c4, t4, m4 = c.reshape(m1, m2, m1, m2), (c @ m).reshape(m1, m2, n1, n2), m.reshape(m1, m2, n1, n2)

    def best(shape, build):
        basis = torch.eye(rank * shape[1] * shape[2], dtype=F64)
        jac = torch.stack([(root @ build(e.reshape(rank, *shape[1:]))).reshape(-1) for e in basis], 1)
        return torch.linalg.lstsq(jac, (root @ m).reshape(-1, 1)).solution.reshape(shape)

    def close(x, ref):                                      # normal equations square C's condition (1e4)
        return float((x - ref).abs().max()) <= 1e-7 * float(ref.abs().max())

    a1 = _ls_step(a, b, c4, t4, m4)
    assert close(a1, best(a.shape, lambda x: kron_materialize(x, b)))
    b1 = _ls_step(b, a1, _mirror(c4), _mirror(t4), _mirror(m4))
    assert close(b1, best(b.shape, lambda y: kron_materialize(a1, y)))


@pytest.mark.parametrize("shape", GS)
def test_gs_weighted_never_worse(shape):
    m = _rand((shape[0] * shape[1], shape[3] * shape[5]), 9)
    c = _gram(m.shape[0], 10)
    w0 = gs_materialize(*project_gs(m, *shape))
    w1 = gs_materialize(*project_gs_weighted(m, c, *shape))
    e0, e1 = weighted_sq_error(m, w0, c), weighted_sq_error(m, w1, c)
    assert e1 <= e0 * (1 + 1e-12)
    assert e1 < 0.95 * e0


def test_weighted_with_identity_gram_matches_frobenius():
    m = _rand((48, 20), 11)
    eye = torch.eye(48, dtype=F64)
    e0 = weighted_sq_error(m, kron_materialize(*project_kronecker(m, 3, (4, 1), (12, 20))))
    e1 = weighted_sq_error(m, kron_materialize(*project_kronecker_weighted(m, eye, 3, (4, 1), (12, 20))))
    assert abs(e1 - e0) <= 1e-9 * e0      # the SVD start is already optimal: ALS must not move off it
    g0 = weighted_sq_error(m, gs_materialize(*project_gs(m, 4, 12, 12, 2, 24, 10)))
    g1 = weighted_sq_error(m, gs_materialize(*project_gs_weighted(m, eye, 4, 12, 12, 2, 24, 10)))
    assert abs(g1 - g0) <= 1e-9 * g0


def test_weighted_in_class_and_singular_gram():
    a, b = _rand((2, 4, 1), 12), _rand((2, 12, 20), 13)
    w = kron_materialize(a, b)
    c = _gram(48, 14, tokens=20)          # rank 20 < 48: singular, as with little calibration data
    a1, b1 = project_kronecker_weighted(w, c, 2, (4, 1), (12, 20))
    assert torch.isfinite(a1).all() and projection_error(w, kron_materialize(a1, b1), c) < 1e-6
    l, r = _rand((4, 12, 12), 15), _rand((2, 24, 10), 16)
    w = gs_materialize(l, r)
    l1, r1 = project_gs_weighted(w, c, 4, 12, 12, 2, 24, 10)
    assert torch.isfinite(l1).all() and projection_error(w, gs_materialize(l1, r1), c) < 1e-6


def test_project_to_spec_dispatch():
    m = _rand((48, 20), 17, torch.float32)
    k = project_to_spec(m, {"kind": "kron", "rank": 2, "a_shape": [4, 1], "b_shape": [12, 20]})
    g = project_to_spec(m, {"kind": "gs", "left": [4, 12, 12], "right": [2, 24, 10]}, _gram(48, 18))
    d = project_to_spec(m, {"kind": "dense", "in": 48, "out": 20})
    assert isinstance(k, KroneckerSum) and isinstance(g, GSMatrix)
    assert torch.equal(d.materialize(), m)
    assert 0 < projection_error(m, k.materialize()) < 1


def test_bad_projection_inputs():
    m = _rand((48, 20), 19)
    with pytest.raises(UserError):
        project_kronecker(m, 5, (4, 1), (12, 20))          # rank > q
    with pytest.raises(UserError):
        project_kronecker(m, 1, (4, 1), (10, 20))          # 40 != 48
    with pytest.raises(UserError):
        project_gs(m, 4, 12, 12, 3, 16, 7)                 # out 21 != 20
    with pytest.raises(UserError):
        project_kronecker_weighted(m, torch.eye(20, dtype=F64), 2, (4, 1), (12, 20))   # gram not in x in
