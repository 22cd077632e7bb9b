"""Small float64 helpers shared by the projections: weighted errors and guarded SPD solves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["weighted_sq_error", "projection_error", "spd_solve", "torch_threads", "gram_svd"]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily run torch ops on n threads. On an oversubscribed machine the many small LAPACK
    calls of the projections run up to 1000x faster on 1 thread than on 2 (a 48x48 weighted GS
    projection: 2.9 s vs 3 ms at load 14 on 2 cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def weighted_sq_error(m: torch.Tensor, w: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """||X (M - W)||_F^2 = tr(E^T C E) with C = X^T X (in x in); plain ||M - W||_F^2 if gram is None."""
    e = (m - w).to(torch.float64)
    if gram is None:
        return float((e * e).sum())
    return float((e * (gram.to(torch.float64) @ e)).sum())


def projection_error(m: torch.Tensor, w: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """Relative error ||X(M - W)||_F / ||X M||_F (Frobenius if gram is None); 0 for M = 0 = W."""
    num = max(weighted_sq_error(m, w, gram), 0.0)   # rounding can give -1e-17 for a PSD gram
    den = weighted_sq_error(m, torch.zeros_like(m), gram)
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def spd_solve(g: torch.Tensor, h: torch.Tensor, ridge: float = 1e-12) -> torch.Tensor:
    """Solve G X = H for symmetric PSD G (batched), with a tiny relative ridge for rank deficiency.

    The ridge is relative to mean(diag G); a singular G falls back to the pseudo-inverse.
    """
    n = g.shape[-1]
    scale = torch.diagonal(g, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    gr = g + (ridge * scale)[..., None, None] * eye
    chol, info = torch.linalg.cholesky_ex(gr)
    if bool((info == 0).all()):
        return torch.cholesky_solve(h, chol)
    return torch.linalg.pinv(g, hermitian=True) @ h


def gram_svd(b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank`` singular triplets of a batch ``b`` [..., m, n] as (U sqrt(S), S, sqrt(S) V^T), from a
    symmetric eigensolve of the short side's Gram: 3-5x faster than LAPACK's batched SVD on the GS blocks
    (144 x 384), and the product of the two factors is the exact rank-``rank`` projection U U^T b (or b V V^T)
    of the eigenvectors, so only singular values below ~1e-8 of the largest lose accuracy (and add nothing).
    Directions whose Gram eigenvalue rounds to zero or below come back as zero columns/rows."""
    m, n = b.shape[-2:]
    wide = m <= n
    g = b @ b.transpose(-1, -2) if wide else b.transpose(-1, -2) @ b
    lam, vec = torch.linalg.eigh(g)                                   # ascending
    lam, vec = lam.flip(-1)[..., :rank], vec.flip(-1)[..., :rank]
    live = lam > 0
    s = lam.clamp_min(0).sqrt()
    inv_root = torch.where(live, s.clamp_min(1e-300).rsqrt(), torch.zeros_like(s))
    root = s.sqrt() * live
    if wide:                                                          # b = U S V^T, U = vec
        left = vec * root[..., None, :]
        right = (vec.transpose(-1, -2) @ b) * inv_root[..., :, None]
    else:                                                             # V = vec
        left = (b @ vec) * inv_root[..., None, :]
        right = vec.transpose(-1, -2) * root[..., :, None]
    return left, s, right
