"""Frobenius ALS (compiler.procrustes): monotone objective, lossless full rank, planted rotations."""

from __future__ import annotations

import pytest
import torch

from procrustes_onnx.compiler.procrustes import (frobenius_als, frobenius_als_global, polar,
                                                 stack_objective, token_weights)


def slab_projection(q: int, r: int):
    """Kronecker projection splitting only the hidden (row) side into q slabs: rank-r SVD (method §3.2)."""
    def proj(m: torch.Tensor) -> torch.Tensor:
        d, n = m.shape
        u, s, vh = torch.linalg.svd(m.reshape(q, (d // q) * n), full_matrices=False)
        return ((u[:, :r] * s[:r]) @ vh[:r]).reshape(d, n)
    return proj


def random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]


def small_rotation(d: int, eps: float, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return torch.linalg.matrix_exp(eps * (a - a.T))


def exact_kron(d: int, n: int, q: int, r: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(q, r, generator=gen, dtype=torch.float64)
    b = torch.randn(r, (d // q) * n, generator=gen, dtype=torch.float64)
    return (a @ b).reshape(d, n)


def test_objective_never_increases():
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(32, n, generator=gen, dtype=torch.float64) for n in (32, 16, 48)]
    projs = [slab_projection(4, 2)] * 3
    res = frobenius_als(mats, projs, [1.0, 2.0, 0.5], iters=30, tol=0.0)
    obj = torch.tensor(res.objective)
    assert len(obj) >= 5
    assert torch.all(obj[1:] <= obj[:-1] * (1 + 1e-12)), obj
    assert obj[-1] < 0.95 * obj[0]  # the rotation actually helps on random data
    q = res.q
    assert torch.allclose(q @ q.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    # the reported objective is the objective of the returned rotation
    again, _ = stack_objective(q, mats, projs, [1.0, 2.0, 0.5])
    assert again == pytest.approx(res.objective[-1], rel=1e-10)


def test_full_rank_structure_is_lossless():
    gen = torch.Generator().manual_seed(1)
    mats = [torch.randn(16, 24, generator=gen, dtype=torch.float64) for _ in range(2)]
    res = frobenius_als(mats, [slab_projection(4, 4)] * 2, iters=5)
    total = sum(float((m ** 2).sum()) for m in mats)
    assert res.objective[-1] <= 1e-20 * total
    for m, p in zip(mats, res.projections):
        assert torch.linalg.norm(res.q @ m - p) / torch.linalg.norm(m) < 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_rotation_is_recovered(seed):
    gen = torch.Generator().manual_seed(seed)
    d, q, r = 24, 4, 1
    structured = [exact_kron(d, n, q, r, gen) for n in (24, 12, 36)]
    planted = small_rotation(d, 0.05, gen)  # stacks are planted^T @ K: the solver must find planted
    mats = [planted.T @ k for k in structured]
    projs = [slab_projection(q, r)] * 3
    res = frobenius_als(mats, projs, iters=200, tol=1e-14)
    rel = (res.objective[-1] / sum(float((m ** 2).sum()) for m in mats)) ** 0.5
    start = (res.objective[0] / sum(float((m ** 2).sum()) for m in mats)) ** 0.5
    assert start > 0.05  # the planted rotation really destroys the structure
    assert rel < 1e-4, (start, rel)


def test_global_variant_stacks_positions():
    gen = torch.Generator().manual_seed(3)
    groups = [([torch.randn(16, 8, generator=gen, dtype=torch.float64)], [slab_projection(4, 2)]),
              ([torch.randn(16, 20, generator=gen, dtype=torch.float64)] * 2, [slab_projection(4, 1)] * 2)]
    res = frobenius_als_global(groups, iters=10, tol=0.0)
    flat = [m for g in groups for m in g[0]]
    direct = frobenius_als(flat, [p for g in groups for p in g[1]], iters=10, tol=0.0)
    assert len(res.projections) == 3
    assert torch.allclose(res.q, direct.q, atol=1e-12)
    assert res.objective[-1] < res.objective[0]


def test_polar_and_token_weights():
    gen = torch.Generator().manual_seed(4)
    q0 = random_orthogonal(8, gen)
    assert torch.allclose(polar(q0 * 3.0), q0, atol=1e-12)
    w = token_weights(torch.tensor([0, 3, 8]))
    assert torch.allclose(w, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        token_weights(torch.tensor([1]), "cube")


def test_polar_survives_an_svd_that_does_not_converge(monkeypatch):
    """gesdd once failed to converge on a nearly orthogonal 576 x 576 matrix (OMP_NUM_THREADS=1): the
    solve must fall back to gesvd instead of crashing after minutes of work."""
    gen = torch.Generator().manual_seed(5)
    q0 = random_orthogonal(16, gen)
    m = q0 + 1e-9 * torch.randn(16, 16, generator=gen, dtype=torch.float64)

    def broken(*_a, **_k):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    q = polar(m)
    assert torch.allclose(q.T @ q, torch.eye(16, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q, q0, atol=1e-7)
