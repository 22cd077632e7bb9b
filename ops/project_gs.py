"""Projections onto GS matrices: Frobenius-optimal per-block truncated SVD, and weighted block least squares.

Block (l, r) of W (rows of L-block l, columns of R-block r) is L_l[:, S_lr] R_r[S_lr, :], where S_lr
are the channels the shuffle routes from l to r (`gs.gs_channels`). Blocks share no parameters, so a
rank-|S_lr| SVD of each block of M is the Frobenius optimum. All arithmetic is float64.
"""

from __future__ import annotations

import torch

from procrustes_onnx.core.errors import UserError

from .gs import check_gs_shapes, gs_channels, gs_materialize, shuffle_perm
from .linalg import spd_solve, weighted_sq_error

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
    """Frobenius-nearest GS matrix: left [..., kl, bl1, bl2], right [..., kr, br1, br2] (batched SVD).

    Channels beyond a block's min(bl1, br2) get zero columns/rows (they cannot add rank).
    """
    _check(m, kl, bl1, bl2, kr, br1, br2)
    lead = m.shape[:-2]
    u, s, vh = torch.linalg.svd(gs_blocks(m.to(torch.float64), kl, kr), full_matrices=False)
    k = s.shape[-1]
    ch = gs_channels(kl, bl2, kr, br1)
    l_, r_, t_, c_, j_ = (torch.as_tensor(ch[key]) for key in ("l", "r", "t", "c", "j"))
    valid = (t_ < k).to(torch.float64)
    tc = t_.clamp(max=k - 1)
    root = s.sqrt()                                                             # [..., kl, kr, k]
    scale = root[..., l_, r_, tc] * valid                                       # [..., n]
    cols = u.transpose(-1, -2)[..., l_, r_, tc, :] * scale[..., None]           # [..., n, bl1]
    rows = vh[..., l_, r_, tc, :] * scale[..., None]                            # [..., n, br2]
    left_t = torch.zeros(*lead, kl, bl2, bl1, dtype=torch.float64)
    left_t[..., l_, c_, :] = cols
    right = torch.zeros(*lead, kr, br1, br2, dtype=torch.float64)
    right[..., r_, j_, :] = rows
    return left_t.transpose(-1, -2).to(m.dtype), right.to(m.dtype)


def _r_step(left, right, m, c):
    """Exact weighted LS for every R block given L: columns of R-block r see only Z_r = (blockdiag(L) P)_r."""
    kl, bl1, bl2 = left.shape
    kr, br1, br2 = right.shape
    z = torch.block_diag(*left)[:, shuffle_perm(kl, bl2)]                        # [in, kr*br1]
    cz = c @ z
    zr = z.reshape(-1, kr, br1).transpose(0, 1)                                  # [kr, in, br1]
    czr = cz.reshape(-1, kr, br1).transpose(0, 1)
    g = zr.transpose(1, 2) @ czr                                                 # [kr, br1, br1]
    h = czr.transpose(1, 2) @ m.reshape(-1, kr, br2).transpose(0, 1)             # [kr, br1, br2]
    return spd_solve(g, h)


def _l_step(left, right, m, c):
    """One Gauss-Seidel sweep of exact per-block LS over L blocks (C couples the row blocks).

    For block l with V_l = (P blockdiag(R)) rows of l: L_l += C_ll^-1 (C E)_l V_l^T (V_l V_l^T)^-1.
    """
    kl, bl1, bl2 = left.shape
    p = shuffle_perm(kl, bl2)
    v = m.new_zeros(kl * bl2, m.shape[1])
    v[p] = torch.block_diag(*right)                                              # V = P blockdiag(R)
    left = left.clone()
    e = m - torch.block_diag(*left) @ v
    ce = c @ e
    for l in range(kl):
        rows = slice(l * bl1, (l + 1) * bl1)
        vl = v[l * bl2:(l + 1) * bl2]
        step = spd_solve(c[rows, rows], ce[rows] @ vl.T)                         # C_ll^-1 (CE)_l V_l^T
        delta = spd_solve(vl @ vl.T, step.T).T                                   # ... (V_l V_l^T)^-1
        left[l] += delta
        dv = delta @ vl
        e[rows] -= dv
        ce -= c[:, rows] @ dv
    return left


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
    best = (weighted_sq_error(m64, gs_materialize(left, right), c64), left, right)
    for _ in range(sweeps):
        right = _r_step(left, right, m64, c64)
        left = _l_step(left, right, m64, c64)
        err = weighted_sq_error(m64, gs_materialize(left, right), c64)
        if not err < best[0]:
            break
        best = (err, left, right)
    return best[1].to(m.dtype), best[2].to(m.dtype)
