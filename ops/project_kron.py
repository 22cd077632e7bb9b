"""Projections onto sums of Kronecker products: Frobenius-optimal (Van Loan-Pitsianis) and weighted ALS.

All arithmetic is float64; factors come back in the input dtype.
"""

from __future__ import annotations

import torch

from procrustes_onnx.core.errors import UserError

from .kron import kron_materialize
from .linalg import spd_solve, weighted_sq_error

__all__ = ["project_kronecker", "project_kronecker_weighted", "kron_rearrange", "thin_svd"]


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


def _mirror(t: torch.Tensor) -> torch.Tensor:
    """[m1, m2, n1, n2] -> [m2, m1, n2, n1]: the same tensor for W = sum b_s (x) a_s (a perfect shuffle of W's
    rows and columns), so the b-step is the a-step of the mirrored problem."""
    return t.permute(1, 0, 3, 2)


def _ls_step(x: torch.Tensor, y: torch.Tensor, c4: torch.Tensor, t4: torch.Tensor, m4: torch.Tensor,
             ) -> torch.Tensor:
    """Exact weighted least squares for the left factors x [r, m1, n1] of sum_s x_s (x) y_s, y [r, m2, n2] fixed.

    c4 = C, t4 = C M and m4 = M as [m1, m2, m1, m2] / [m1, m2, n1, n2]. The normal equations, one system of
    r*m1 unknowns shared by the n1 columns of x, are
        G[(s,p),(t,c)] = sum_{i,k,j} y_s[i,j] C[(p,i),(c,k)] y_t[k,j],   H[(s,p),u] = sum_{i,j} y_s[i,j] T[(p,i),(u,j)].
    G is contracted in the cheaper of two GEMM orders, y's Gram first (r*m2)^2 or C y first (m1^2 m2 r n2), so
    neither the paper's input side (a q x 1: small y Gram) nor its output side (a 1 x q, b n x d/q: an (r n)^2
    y Gram would be 1.2 GB at n = 1536) forms a tensor larger than C times a factor. With m2 == 1 every row
    of W is one row of x and the weighting cancels (C acts on W's rows only): the plain step is optimal.
    """
    r, m1, n1 = x.shape
    _, m2, n2 = y.shape
    yf = y.reshape(r, m2 * n2)
    if m2 == 1:
        rm = m4.permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)                      # kron_rearrange(M)
        return spd_solve(yf @ yf.T, yf @ rm.T).reshape(r, m1, n1)
    if r * m2 * (n2 + m1 * m1) <= n2 * m1 * m1 * (m2 + r):                          # y's Gram first
        yy = y.reshape(r * m2, n2)
        yy = (yy @ yy.T).reshape(r, m2, r, m2).permute(0, 2, 1, 3).reshape(r * r, m2 * m2)     # [(s,t), (i,k)]
        cp = c4.permute(0, 2, 1, 3).reshape(m1 * m1, m2 * m2)                                    # [(p,c), (i,k)]
        g = (yy @ cp.T).reshape(r, r, m1, m1).permute(0, 2, 1, 3).reshape(r * m1, r * m1)
    else:                                                                            # C y first
        cy = c4.reshape(m1 * m2 * m1, m2) @ y.permute(1, 0, 2).reshape(m2, r * n2)              # [(p,i,c), (t,j)]
        cy = cy.reshape(m1, m2, m1, r, n2).permute(1, 4, 0, 2, 3).reshape(m2 * n2, m1 * m1 * r)  # [(i,j), (p,c,t)]
        g = (yf @ cy).reshape(r, m1, m1, r).permute(0, 1, 3, 2).reshape(r * m1, r * m1)
    tr = t4.permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)                                        # [(p,u), (i,j)]
    return spd_solve(g, (yf @ tr.T).reshape(r * m1, n1)).reshape(r, m1, n1)


def project_kronecker_weighted(m: torch.Tensor, gram: torch.Tensor, rank: int, a_shape, b_shape, *,
                               sweeps: int = 3, init: tuple[torch.Tensor, torch.Tensor] | None = None,
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize ||X (M - sum a_s (x) b_s)||_F for gram C = X^T X (in x in) by alternating exact least squares.

    The one weighted Kronecker projection (the compiler's `project_weighted` calls it through
    `project_factors`): any factor shapes, as dense GEMMs sized for the paper's slab shapes (`_ls_step`).
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
    m4 = m64.reshape(m1, m2, n1, n2)
    best = (weighted_sq_error(m64, kron_materialize(a, b), c64), a, b)
    for _ in range(sweeps):
        a = _ls_step(a, b, c4, t4, m4)
        b = _ls_step(b, a, _mirror(c4), _mirror(t4), _mirror(m4))
        err = weighted_sq_error(m64, kron_materialize(a, b), c64)
        if not err < best[0]:
            break
        best = (err, a, b)
    return best[1].to(m.dtype), best[2].to(m.dtype)
