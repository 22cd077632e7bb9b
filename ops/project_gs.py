"""Projections onto GS matrices: Frobenius-optimal per-block truncated SVD, and weighted block least squares.

Block (l, r) of W (rows of L-block l, columns of R-block r) is L_l[:, S_lr] R_r[S_lr, :], where S_lr
are the channels the shuffle routes from l to r (`gs.gs_channels`). Blocks share no parameters, so a
rank-|S_lr| SVD of each block of M is the Frobenius optimum. All arithmetic is float64.
"""

from __future__ import annotations

import torch

from procrustes_onnx.core.errors import UserError

from .gs import check_gs_shapes, gs_channels, shuffle_perm
from .linalg import gram_svd, spd_solve

__all__ = ["project_gs", "project_gs_weighted", "gs_blocks", "gs_discarded_sq"]


def _check(m: torch.Tensor, kl, bl1, bl2, kr, br1, br2) -> None:
    check_gs_shapes(kl, bl1, bl2, kr, br1, br2)
    if m.dim() < 2 or tuple(m.shape[-2:]) != (kl * bl1, kr * br2):
        raise UserError(f"GS shapes give a {kl * bl1}x{kr * br2} matrix but M is {tuple(m.shape[-2:])}; "
                        f"pick kl*bl1 = in and kr*br2 = out")


def gs_blocks(m: torch.Tensor, kl: int, kr: int) -> torch.Tensor:
    """M [..., kl*bl1, kr*br2] -> blocks [..., kl, kr, bl1, br2]."""
    *lead, rows, cols = m.shape
    return m.reshape(*lead, kl, rows // kl, kr, cols // kr).transpose(-3, -2)


def gs_discarded_sq(m: torch.Tensor, kl, bl1, bl2, kr, br1, br2) -> torch.Tensor:
    """Sum over blocks of the squared singular values beyond each block's rank (the optimal error^2)."""
    s = torch.linalg.svdvals(gs_blocks(m.to(torch.float64), kl, kr))          # [..., kl, kr, k]
    counts = torch.as_tensor(gs_channels(kl, bl2, kr, br1)["counts"])
    keep = torch.arange(s.shape[-1])[None, None, :] < counts[:, :, None]
    return (s * s * (~keep)).sum((-1, -2, -3))


def project_gs(m: torch.Tensor, kl: int, bl1: int, bl2: int, kr: int, br1: int, br2: int,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frobenius-nearest GS matrix: left [..., kl, bl1, bl2], right [..., kr, br1, br2] (each block's
    truncated SVD, batched, from its Gram's eigensolve: `linalg.gram_svd`).

    Channels beyond a block's min(bl1, br2) get zero columns/rows (they cannot add rank).
    """
    _check(m, kl, bl1, bl2, kr, br1, br2)
    lead = m.shape[:-2]
    ch = gs_channels(kl, bl2, kr, br1)
    k = min(bl1, br2, int(ch["counts"].max()))                                  # the most any block keeps
    u_root, _, root_vh = gram_svd(gs_blocks(m.to(torch.float64), kl, kr), k)    # U sqrt(S), sqrt(S) V^T
    l_, r_, t_, c_, j_ = (torch.as_tensor(ch[key], device=m.device) for key in ("l", "r", "t", "c", "j"))
    valid = (t_ < k).to(torch.float64)
    tc = t_.clamp(max=k - 1)
    cols = u_root.transpose(-1, -2)[..., l_, r_, tc, :] * valid[..., None]     # [..., n, bl1]
    rows = root_vh[..., l_, r_, tc, :] * valid[..., None]                       # [..., n, br2]
    left_t = torch.zeros(*lead, kl, bl2, bl1, dtype=torch.float64, device=m.device)
    left_t[..., l_, c_, :] = cols
    right = torch.zeros(*lead, kr, br1, br2, dtype=torch.float64, device=m.device)
    right[..., r_, j_, :] = rows
    return left_t.transpose(-1, -2).to(m.dtype), right.to(m.dtype)


class _WeightedGS:
    """The state of the weighted GS least squares for one M [in, out] and gram C, kept in the products the
    steps need so that no step multiplies C by a dense in x out matrix except the one-time C M.

    Z = blockdiag(L) P (in x inner) and V = P blockdiag(R) (inner x out), so W = Z blockdiag(R) = blockdiag(L) V.
    C Z is built block by block (in^2 bl2 flops instead of in^2 inner), C E = C M - (C Z) blockdiag(R), and
    the L sweep tracks the error exactly as tr(E^T C E) changes, instead of re-forming and re-weighting W.
    """

    def __init__(self, m: torch.Tensor, c: torch.Tensor, kl: int, kr: int) -> None:
        self.m, self.c, self.kl, self.kr = m, c, kl, kr
        self.cm = c @ m                                                              # the one dense C-product

    def products(self, left: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z, C Z), both in x inner, from the blocks of L. C Z is taken block by block from column slices of C
        (a batched product over a strided view of C would first copy all of C)."""
        kl, bl1, bl2 = left.shape
        p = shuffle_perm(kl, bl2)
        z = torch.block_diag(*left)[:, p]
        cz = torch.empty_like(z)
        where = torch.argsort(p)                                                     # column of CZ for Z's column
        for l in range(kl):
            cz[:, where[l * bl2:(l + 1) * bl2]] = self.c[:, l * bl1:(l + 1) * bl1] @ left[l]
        return z, cz

    def _times_right(self, a: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """a [in, inner] @ blockdiag(R), one R block at a time on column slices of a (no copy of a)."""
        kr, br1, br2 = right.shape
        out = a.new_empty(a.shape[0], kr * br2)
        for r in range(kr):
            out[:, r * br2:(r + 1) * br2] = a[:, r * br1:(r + 1) * br1] @ right[r]
        return out

    def r_step(self, z: torch.Tensor, cz: torch.Tensor, br1: int) -> torch.Tensor:
        """Exact weighted LS for every R block given L: columns of R-block r see only Z_r."""
        kr, cols = self.kr, self.m.shape[1] // self.kr
        g, h = [], []
        for r in range(kr):
            czr = cz[:, r * br1:(r + 1) * br1]
            g.append(z[:, r * br1:(r + 1) * br1].T @ czr)                               # [br1, br1]
            h.append(czr.T @ self.m[:, r * cols:(r + 1) * cols])
        return spd_solve(torch.stack(g), torch.stack(h))

    def residual(self, z: torch.Tensor, cz: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(C E, tr(E^T C E)) for E = M - W, W = Z blockdiag(R), block by block over R."""
        ce = self._times_right(cz, right).neg_().add_(self.cm)                      # in place: no temporaries
        e = self._times_right(z, right).neg_().add_(self.m)
        return ce, float(torch.dot(e.view(-1), ce.view(-1)))

    def l_sweep(self, left: torch.Tensor, right: torch.Tensor, ce: torch.Tensor, err: float,
                ) -> tuple[torch.Tensor, float]:
        """One Gauss-Seidel sweep of exact per-block LS over the L blocks (C couples the row blocks):
        L_l += C_ll^-1 (C E)_l V_l^T (V_l V_l^T)^-1, then (C E) of the later blocks (``ce``, in place) and the
        error updated."""
        kl, bl1, bl2 = left.shape
        v = self.m.new_zeros(kl * bl2, self.m.shape[1])
        v[shuffle_perm(kl, bl2)] = torch.block_diag(*right)                         # V = P blockdiag(R)
        left = left.clone()                                                          # ce is updated in place
        for l in range(kl):
            rows = slice(l * bl1, (l + 1) * bl1)
            vl = v[l * bl2:(l + 1) * bl2]
            step = spd_solve(self.c[rows, rows], ce[rows] @ vl.T)                    # C_ll^-1 (CE)_l V_l^T
            delta = spd_solve(vl @ vl.T, step.T).T                                   # ... (V_l V_l^T)^-1
            left[l] += delta
            dv = delta @ vl                                                          # E_l -= dv
            cdv = self.c[l * bl1:, rows] @ dv                                        # C[rows >= l, rows_l] dv
            err += float((dv * (cdv[:bl1] - 2.0 * ce[rows])).sum())
            ce[(l + 1) * bl1:] -= cdv[bl1:]
        return left, err


def project_gs_weighted(m: torch.Tensor, gram: torch.Tensor, kl: int, bl1: int, bl2: int, kr: int, br1: int,
                        br2: int, *, sweeps: int = 2, init: tuple[torch.Tensor, torch.Tensor] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize ||X (M - W)||_F over GS matrices W for gram C = X^T X, by alternating R and L block steps.

    Starts at `init` or the Frobenius projection; returns the best iterate in the weighted norm.
    """
    _check(m, kl, bl1, bl2, kr, br1, br2)
    if m.dim() != 2 or tuple(gram.shape) != (kl * bl1, kl * bl1):
        raise UserError(f"weighted GS projection needs M [in, out] and a gram [in, in] with in={kl * bl1}, "
                        f"got M {tuple(m.shape)} and gram {tuple(gram.shape)}")
    m64, c64 = m.to(torch.float64), gram.to(torch.float64)
    left, right = init if init is not None else project_gs(m64, kl, bl1, bl2, kr, br1, br2)
    left, right = left.to(torch.float64), right.to(torch.float64)
    state = _WeightedGS(m64, c64, kl, kr)
    z, cz = state.products(left)
    best = (state.residual(z, cz, right)[1], left, right)
    for _ in range(sweeps):
        right = state.r_step(z, cz, br1)
        ce, err = state.residual(z, cz, right)
        z = cz = None                                                                # free before the next products
        left, err = state.l_sweep(left, right, ce, err)
        del ce
        z, cz = state.products(left)
        if not err < best[0]:
            break
        best = (err, left, right)
    return best[1].to(m.dtype), best[2].to(m.dtype)
