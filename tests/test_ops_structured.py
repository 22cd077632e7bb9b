"""Structured matrices: products vs the dense materialization, spec round trips, bad inputs."""

import pytest
import torch

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.ops import (DenseMatrix, GSMatrix, KroneckerSum, StructuredLinear, gs_channels, gs_materialize,
                                 kron_apply, shuffle_perm, structured_from_spec)
from procrustes_onnx.ops.linalg import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Small float64 solves: 1 thread avoids OpenMP stalls on a shared machine (see torch_threads)."""
    with torch_threads(1):
        yield


KRON_SHAPES = [(3, 4, 1, 16, 24), (3, 1, 4, 24, 16), (2, 3, 5, 4, 2), (1, 1, 1, 7, 9), (4, 2, 2, 3, 3)]
GS_SHAPES = [(4, 16, 16, 2, 32, 32), (2, 8, 12, 4, 6, 5), (4, 6, 10, 8, 5, 3), (3, 4, 5, 5, 3, 2), (1, 5, 4, 1, 4, 3)]


def _rel(y, ref):
    return float((y - ref).norm() / ref.norm())


def _mats(dtype):
    g = torch.Generator().manual_seed(0)
    for r, m1, n1, m2, n2 in KRON_SHAPES:
        yield KroneckerSum(torch.randn(r, m1, n1, generator=g, dtype=dtype),
                           torch.randn(r, m2, n2, generator=g, dtype=dtype))
    for kl, bl1, bl2, kr, br1, br2 in GS_SHAPES:
        yield GSMatrix(torch.randn(kl, bl1, bl2, generator=g, dtype=dtype),
                       torch.randn(kr, br1, br2, generator=g, dtype=dtype))
    yield DenseMatrix(torch.randn(6, 5, generator=g, dtype=dtype))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)])
def test_product_matches_dense(dtype, tol, lead):
    g = torch.Generator().manual_seed(1)
    for mat in _mats(dtype):
        x = torch.randn(*lead, mat.in_features, generator=g, dtype=dtype)
        w = mat.materialize()
        assert w.shape == (mat.in_features, mat.out_features)
        y = mat(x)
        assert y.shape == (*lead, mat.out_features)
        assert _rel(y, x @ w) < tol, mat.spec()


def test_both_kron_orders_agree_and_macs_pick_cheaper():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 4, 1, generator=g, dtype=torch.float64), torch.randn(3, 16, 24, generator=g, dtype=torch.float64)
    x = torch.randn(5, 64, generator=g, dtype=torch.float64)
    ya, yb = kron_apply(x, a, b, "a_first"), kron_apply(x, a, b, "b_first")
    assert _rel(ya, yb) < 1e-12
    k = KroneckerSum(a, b)
    assert k.order == "a_first"
    assert k.macs(7) == 7 * 3 * 1 * 16 * (4 + 24)   # r*n1*m2*(m1+n2) per token
    assert k.num_params == 3 * 4 + 3 * 16 * 24


def test_shuffle_definition():
    # p[i] = (i mod kl)*bl2 + i // kl; for kl=2, bl2=3: z = [l0c0 l0c1 l0c2 l1c0 l1c1 l1c2]
    assert shuffle_perm(2, 3).tolist() == [0, 3, 1, 4, 2, 5]
    # one-hot L and R expose P itself: W = blockdiag(I) P blockdiag(I) is the permutation matrix
    gs = GSMatrix(torch.eye(3).repeat(2, 1, 1), torch.eye(2).repeat(3, 1, 1))
    w = gs.materialize()
    p = shuffle_perm(2, 3)
    assert torch.equal(w, torch.eye(6)[:, p])     # P[p[i], i] = 1, so u = z P has u[i] = z[p[i]]
    z = torch.arange(6.0)
    assert torch.equal(gs(z), z[p])
    assert gs_channels(4, 6, 8, 3)["counts"].sum() == 24


def test_spec_round_trip_and_linear():
    g = torch.Generator().manual_seed(3)
    for mat in _mats(torch.float32):
        rebuilt = structured_from_spec(mat.spec(), mat.factors())
        assert torch.equal(rebuilt.materialize(), mat.materialize())
        assert rebuilt.spec() == mat.spec()
        bias = torch.randn(mat.out_features, generator=g)
        lin = StructuredLinear(mat, bias)
        assert (lin.in_features, lin.out_features) == (mat.in_features, mat.out_features)
        x = torch.randn(2, 3, mat.in_features, generator=g)
        assert _rel(lin(x), lin.to_linear()(x)) < 1e-5
        assert lin.num_params == mat.num_params + mat.out_features
    zeros = structured_from_spec({"kind": "gs", "left": [2, 3, 4], "right": [4, 2, 5]})
    assert zeros.materialize().abs().sum() == 0 and zeros.shape == (6, 20)


@pytest.mark.parametrize("bad", [
    {"kind": "gs", "left": [2, 3, 4], "right": [3, 2, 5]},          # kl*bl2 != kr*br1
    {"kind": "kron", "rank": 0, "a_shape": [2, 1], "b_shape": [3, 3]},
    {"kind": "kron", "rank": 1, "a_shape": [2, 1], "b_shape": [3, 3], "in": 5},
    {"kind": "lowrank"},
    {"kind": "dense"},
])
def test_bad_specs_raise_user_error(bad):
    with pytest.raises(UserError):
        structured_from_spec(bad)


def test_bad_tensors_raise_user_error():
    with pytest.raises(UserError):
        structured_from_spec({"kind": "dense", "in": 2, "out": 3}, {"weight": torch.zeros(3, 2)})
    with pytest.raises(UserError):
        KroneckerSum(torch.zeros(2, 3, 1), torch.zeros(3, 4, 4))
    with pytest.raises(UserError):
        StructuredLinear(DenseMatrix(torch.zeros(2, 3)), torch.zeros(2))


def test_kron_layout_cache_follows_in_place_updates():
    g = torch.Generator().manual_seed(4)
    k = KroneckerSum(torch.randn(2, 4, 1, generator=g), torch.randn(2, 6, 5, generator=g))
    x = torch.randn(3, 24, generator=g)
    with torch.no_grad():
        y0 = k(x)
        k.b.mul_(2.0)                     # in-place change must invalidate the cached layouts
        assert _rel(k(x), 2 * y0) < 1e-6
    k.a.requires_grad_(True)
    k(x).sum().backward()                 # with grad enabled the layouts are rebuilt, so autograd works
    assert k.a.grad is not None and k.a.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [((4, 12, 6), (3, 8, 10)), ((2, 5, 7), (7, 2, 3)), ((3, 4, 4), (2, 6, 5))])
def test_gs_materialize_is_the_product_of_its_definition(shape):
    """Block by block (only the pairs the shuffle connects) equals blockdiag(L) P blockdiag(R) as written."""
    g = torch.Generator().manual_seed(3)
    left = torch.randn(*shape[0], generator=g, dtype=torch.float64)
    right = torch.randn(*shape[1], generator=g, dtype=torch.float64)
    ref = torch.block_diag(*left)[:, shuffle_perm(shape[0][0], shape[0][2])] @ torch.block_diag(*right)
    assert _rel(gs_materialize(left, right), ref) < 1e-14
