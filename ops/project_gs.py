"""Projections onto GS matrices: Frobenius-optimal per-block truncated SVD, and weighted block least squares.

Block (l, r) of W (rows of L-block l, columns of R-block r) is L_l[:, S_lr] R_r[S_lr, :], where S_lr
are the channels the shuffle routes from l to r (`gs.gs_channels`). Blocks share no parameters, so a
rank-|S_lr| SVD of each block of M is the Frobenius optimum. All arithmetic is float64.
"""

from __future__ import annotations

import torch

from procrustes_onnx.core.errors import UserError

from .gs import check_gs_shapes, gs_channels, gs_pairs
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
    R block r reads only Z_r, the br1 columns of Z routed to it, so the R step, C E = C M - (C Z) blockdiag(R)
    and the error go one R block at a time: Z and C Z are never held whole (at in 8192 each is 0.25 GiB), and
    C Z_r is built from the L blocks' columns (in^2 bl2 flops over all r, as for the whole C Z). The L sweep
    tracks the error exactly as tr(E^T C E) changes, instead of re-forming and re-weighting W.
    """

    def __init__(self, m: torch.Tensor, c: torch.Tensor, kl: int, bl2: int, kr: int, br1: int) -> None:
        self.m, self.c, self.kl, self.kr, self.br1 = m, c, kl, kr, br1
        self.pairs = gs_pairs(kl, bl2, kr, br1)
        self.cm = c @ m                                                              # the one dense C-product

    def z_block(self, left: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z_r, C Z_r), both in x br1: column j of Z_r is column c of L_l, in L_l's rows, for the channels
        the shuffle routes from l to row j of R_r (C Z_r from column slices of C: no copy of C)."""
        bl1 = left.shape[1]
        z = self.m.new_zeros(self.m.shape[0], self.br1)
        cz = self.m.new_empty(self.m.shape[0], self.br1)                             # every column is some pair's
        for l, rr, cols, rows in self.pairs:
            if rr == r:
                piece = left[l][:, cols.to(left.device)]
                rows = rows.to(left.device)
                z[l * bl1:(l + 1) * bl1, rows] = piece
                cz[:, rows] = self.c[:, l * bl1:(l + 1) * bl1] @ piece
        return z, cz

    def right_step(self, left: torch.Tensor, right: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(R, C E, tr(E^T C E)) for E = M - Z blockdiag(R), one R block at a time. R is the exact weighted LS
        given L (``right`` None: columns of R-block r see only Z_r) or ``right`` as given."""
        cols = self.m.shape[1] // self.kr
        ce = torch.empty_like(self.cm)
        blocks, err = [], 0.0
        for r in range(self.kr):
            z, cz = self.z_block(left, r)
            span = slice(r * cols, (r + 1) * cols)
            block = spd_solve(z.T @ cz, cz.T @ self.m[:, span]) if right is None else right[r]
            ce[:, span] = (cz @ block).neg_().add_(self.cm[:, span])
            e = (z @ block).neg_().add_(self.m[:, span])
            err += float((e * ce[:, span]).sum())
            blocks.append(block)
        return torch.stack(blocks), ce, err

    def v_block(self, right: torch.Tensor, l: int, bl2: int) -> torch.Tensor:
        """V_l, the bl2 rows of V = P blockdiag(R) that L block l feeds (bl2 x out; V whole is kl times that): row
        c is row j of R_r, in R_r's columns, for the channels the shuffle routes from column c of L_l to R_r."""
        br2 = right.shape[2]
        v = self.m.new_zeros(bl2, self.m.shape[1])
        for ll, r, cols, rows in self.pairs:
            if ll == l:
                v[cols.to(v.device), r * br2:(r + 1) * br2] = right[r][rows.to(v.device)]
        return v

    def l_sweep(self, left: torch.Tensor, right: torch.Tensor, ce: torch.Tensor, err: float,
                ) -> tuple[torch.Tensor, float]:
        """One Gauss-Seidel sweep of exact per-block LS over the L blocks (C couples the row blocks):
        L_l += C_ll^-1 (C E)_l V_l^T (V_l V_l^T)^-1, then (C E) of the later blocks (``ce``, in place) and the
        error updated."""
        kl, bl1, bl2 = left.shape
        left = left.clone()                                                          # ce is updated in place
        for l in range(kl):
            rows = slice(l * bl1, (l + 1) * bl1)
            vl = self.v_block(right, l, bl2)
            step = spd_solve(self.c[rows, rows], ce[rows] @ vl.T)                    # C_ll^-1 (CE)_l V_l^T
            delta = spd_solve(vl @ vl.T, step.T).T                                   # ... (V_l V_l^T)^-1
            left[l] += delta
            dv = delta @ vl                                                          # E_l -= dv
            err += float((dv * (self.c[rows, rows] @ dv - 2.0 * ce[rows])).sum())
            for k in range(l + 1, kl):                                               # C[rows_k, rows_l] dv
                ce[k * bl1:(k + 1) * bl1] -= self.c[k * bl1:(k + 1) * bl1, rows] @ dv
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
    state = _WeightedGS(m64, c64, kl, bl2, kr, br1)
    best = (state.right_step(left, right)[2], left, right)
    for _ in range(sweeps):
        right, ce, err = state.right_step(left)
        left, err = state.l_sweep(left, right, ce, err)
        del ce
        if not err < best[0]:
            break
        best = (err, left, right)
    return best[1].to(m.dtype), best[2].to(m.dtype)
