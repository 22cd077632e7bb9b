"""Projections onto sums of Kronecker products: Frobenius-optimal (Van Loan-Pitsianis) and weighted ALS.

All arithmetic is float64; factors come back in the input dtype.
"""

from __future__ import annotations

import logging

import torch

from procrustes_onnx.core.errors import UserError

from .kron import kron_materialize
from .linalg import spd_solve, weighted_sq_error

__all__ = ["project_kronecker", "project_kronecker_weighted", "kron_rearrange", "thin_svd", "MAX_SYSTEM"]

log = logging.getLogger(__name__)

MAX_SYSTEM = 6144  # largest dense normal-equation system (r*m) an ALS half-step will form


def _check(m: torch.Tensor, rank: int, a_shape, b_shape) -> tuple[int, int, int, int]:
    (m1, n1), (m2, n2) = a_shape, b_shape
    if m.dim() < 2 or tuple(m.shape[-2:]) != (m1 * m2, n1 * n2):
        raise UserError(f"Kronecker shapes a {tuple(a_shape)} (x) b {tuple(b_shape)} give a "
                        f"{m1 * m2}x{n1 * n2} matrix but M is {tuple(m.shape[-2:])}; pick factors whose "
                        f"products match M")
    if not 1 <= rank <= min(m1 * n1, m2 * n2):
        raise UserError(f"Kronecker rank {rank} is outside 1..{min(m1 * n1, m2 * n2)} for a {tuple(a_shape)}, "
                        f"b {tuple(b_shape)}; lower the rank or enlarge the factors")
    return m1, n1, m2, n2


def kron_rearrange(m: torch.Tensor, a_shape, b_shape) -> torch.Tensor:
    """R[..., (i1, j1), (i2, j2)] = M[..., (i1, i2), (j1, j2)]: each row one vectorized m2 x n2 block.

    ||M - sum a_s (x) b_s||_F = ||R - sum vec(a_s) vec(b_s)^T||_F, so a rank-r SVD of R is optimal.
    With n1 == 1 or m2 == 1 (the paper's input side: a is q x 1) this is a pure reshape.
    """
    (m1, n1), (m2, n2) = a_shape, b_shape
    lead = m.shape[:-2]
    return m.reshape(*lead, m1, m2, n1, n2).transpose(-3, -2).reshape(*lead, m1 * n1, m2 * n2)


def thin_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a very wide or tall matrix (e.g. 4 x 82944) via QR of the long side, then a small SVD.

    LAPACK's gesdd on such shapes is several times slower than this; results agree to rounding.
    """
    rows, cols = x.shape[-2:]
    if cols > 4 * rows:
        q, r = torch.linalg.qr(x.transpose(-1, -2))                   # x = r^T q^T
        u, s, vh = torch.linalg.svd(r.transpose(-1, -2))
        return u, s, vh @ q.transpose(-1, -2)
    if rows > 4 * cols:
        q, r = torch.linalg.qr(x)                                      # x = q r
        u, s, vh = torch.linalg.svd(r)
        return q @ u, s, vh
    return torch.linalg.svd(x, full_matrices=False)


def project_kronecker(m: torch.Tensor, rank: int, a_shape, b_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Frobenius-nearest sum of `rank` Kronecker products: a [..., r, m1, n1], b [..., r, m2, n2].

    M may carry leading batch dims (one batched SVD). Error^2 = sum of discarded singular values^2 of
    `kron_rearrange(M)` (Eckart-Young).
    """
    m1, n1, m2, n2 = _check(m, rank, a_shape, b_shape)
    lead = m.shape[:-2]
    rm = kron_rearrange(m.to(torch.float64), (m1, n1), (m2, n2))
    u, s, vh = thin_svd(rm)
    root = s[..., :rank].sqrt()
    a = (u[..., :, :rank] * root[..., None, :]).transpose(-1, -2).reshape(*lead, rank, m1, n1)
    b = (root[..., :, None] * vh[..., :rank, :]).reshape(*lead, rank, m2, n2)
    return a.to(m.dtype), b.to(m.dtype)


def _unweighted_a(a: torch.Tensor, b: torch.Tensor, rm: torch.Tensor) -> torch.Tensor:
    """Least-squares a for fixed b in the rearranged (unweighted) problem R ~ vec(a)^T vec(b)."""
    r, m1, n1 = a.shape
    bm = b.reshape(r, -1)
    return spd_solve(bm @ bm.T, bm @ rm.T).reshape(r, m1, n1)


def _unweighted_b(a: torch.Tensor, b: torch.Tensor, rm: torch.Tensor) -> torch.Tensor:
    """Least-squares b for fixed a in the rearranged (unweighted) problem."""
    r, m2, n2 = b.shape
    am = a.reshape(r, -1)
    return spd_solve(am @ am.T, am @ rm).reshape(r, m2, n2)


def _a_step(a, b, c4, t4, rm):
    """Exact weighted least squares for a with b fixed (normal equations of size r*m1).

    G[(s,a),(t,c)] = sum_{i,k} (sum_j b_s[i,j] b_t[k,j]) C[a,i,c,k];  H[(s,a),b] = sum_{i,j} b_s[i,j] T[a,i,b,j].
    When m2 == 1 the rows of W are indexed by a alone and the weighting cancels: use the plain step.
    """
    r, m1, n1 = a.shape
    if b.shape[1] == 1:
        return _unweighted_a(a, b, rm)
    if r * m1 > MAX_SYSTEM:
        log.debug("skip weighted a-step: system %d > %d", r * m1, MAX_SYSTEM)
        return a
    bb = torch.einsum("sij,tkj->sitk", b, b)
    g = torch.einsum("sitk,aick->satc", bb, c4).reshape(r * m1, r * m1)
    h = torch.einsum("sij,aibj->sab", b, t4).reshape(r * m1, n1)
    return spd_solve(g, h).reshape(r, m1, n1)


def _b_step(a, b, c4, t4, rm):
    """Exact weighted least squares for b with a fixed (size r*m2); plain step when m1 == 1."""
    r, m2, n2 = b.shape
    if a.shape[1] == 1:
        return _unweighted_b(a, b, rm)
    if r * m2 > MAX_SYSTEM:
        log.debug("skip weighted b-step: system %d > %d", r * m2, MAX_SYSTEM)
        return b
    aa = torch.einsum("sab,tcb->satc", a, a)
    g = torch.einsum("satc,aick->sitk", aa, c4).reshape(r * m2, r * m2)
    h = torch.einsum("sab,aibj->sij", a, t4).reshape(r * m2, n2)
    return spd_solve(g, h).reshape(r, m2, n2)


def project_kronecker_weighted(m: torch.Tensor, gram: torch.Tensor, rank: int, a_shape, b_shape, *,
                               sweeps: int = 3, init: tuple[torch.Tensor, torch.Tensor] | None = None,
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize ||X (M - sum a_s (x) b_s)||_F for gram C = X^T X (in x in) by alternating exact least squares.

    Starts at `init` or the Frobenius projection, runs `sweeps` (a-step, b-step) sweeps, and returns the
    best iterate in the weighted norm, so the result is never worse than the start.
    """
    m1, n1, m2, n2 = _check(m, rank, a_shape, b_shape)
    if m.dim() != 2 or tuple(gram.shape) != (m1 * m2, m1 * m2):
        raise UserError(f"weighted Kronecker projection needs M [in, out] and a gram [in, in] with in={m1 * m2}, "
                        f"got M {tuple(m.shape)} and gram {tuple(gram.shape)}")
    m64, c64 = m.to(torch.float64), gram.to(torch.float64)
    a, b = init if init is not None else project_kronecker(m64, rank, (m1, n1), (m2, n2))
    a, b = a.to(torch.float64), b.to(torch.float64)
    c4 = c64.reshape(m1, m2, m1, m2)
    t4 = (c64 @ m64).reshape(m1, m2, n1, n2)
    rm = kron_rearrange(m64, (m1, n1), (m2, n2))
    best = (weighted_sq_error(m64, kron_materialize(a, b), c64), a, b)
    for _ in range(sweeps):
        a = _a_step(a, b, c4, t4, rm)
        b = _b_step(a, b, c4, t4, rm)
        err = weighted_sq_error(m64, kron_materialize(a, b), c64)
        if not err < best[0]:
            break
        best = (err, a, b)
    return best[1].to(m.dtype), best[2].to(m.dtype)
