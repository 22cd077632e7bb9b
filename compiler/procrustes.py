"""Frobenius-norm ProcrustesGPT solver (method.md §3.1): alternate structured projection and
orthogonal Procrustes for one residual position, or for all positions at once (global rotation).

Pure tensor math in float64, no model code. Orientation: every matrix is *stacked* with the hidden
dimension as rows (d x n): a reading weight W (in x out, in = d) as is, a writing weight (out = d)
as W^T. A rotation ``q`` acts on the stack as ``q @ M``; in model terms ``q`` is R^T where the
residual stream is rotated as ``h -> h @ R`` (reading weights become R^T W, writing weights W R).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import scipy.linalg
import torch

from .fanout import map_threads

__all__ = [
    "Projection",
    "AlsResult",
    "procrustes_rotation",
    "polar",
    "stack_objective",
    "frobenius_als",
    "frobenius_als_global",
    "token_weights",
]

log = logging.getLogger(__name__)

Projection = Callable[[torch.Tensor], torch.Tensor]
"""Maps a stacked d x n matrix to its nearest structured matrix (same shape), in the Frobenius norm."""
Mapper = Callable[[Callable, Sequence], list]
"""``map``-like: applies a function to independent items, results in order (`fanout.map_threads`)."""


@dataclass
class AlsResult:
    """Result of an alternating solve: the rotation, the objective after every projection (the first
    entry is at the starting rotation), and the structured approximations of ``q @ M_i``."""

    q: torch.Tensor
    objective: list[float] = field(default_factory=list)
    projections: list[torch.Tensor] = field(default_factory=list)
    iterations: int = 0


def polar(m: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor U V^T of ``m``: the orthogonal matrix maximising tr(Q^T m).

    LAPACK's divide-and-conquer SVD (gesdd) has returned non-orthogonal factors for badly scaled
    inputs here, and has failed to converge on a nearly orthogonal 576 x 576 input (all singular values
    near 1: the re-orthogonalisation after a rotation solve), so the result is checked and recomputed
    with the QR-iteration driver (gesvd) if needed.
    """
    m = m.double()
    eye = torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
    try:
        u, _, vh = torch.linalg.svd(m)
        q = u @ vh
    except torch.linalg.LinAlgError:
        q = torch.full_like(m, float("nan"))
    if not bool(torch.isfinite(q).all()) or float((q.T @ q - eye).abs().max()) > 1e-8:
        u, _, vh = scipy.linalg.svd(np.nan_to_num(m.cpu().numpy()), lapack_driver="gesvd")
        q = torch.from_numpy(u @ vh).to(m.device)
    return q


def procrustes_rotation(cross: torch.Tensor) -> torch.Tensor:
    """argmin over orthogonal Q of sum_i ||Q M_i - T_i||^2 given cross = sum_i T_i M_i^T (d x d)."""
    return polar(cross)


def _as64(mats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [m.detach().to(torch.float64) for m in mats]


def stack_objective(q: torch.Tensor, mats: Sequence[torch.Tensor], projections: Sequence[Projection],
                    weights: Sequence[float] | None = None, mapper: Mapper = map_threads,
                    ) -> tuple[float, list[torch.Tensor]]:
    """sum_i w_i ||q M_i - P_i(q M_i)||_F^2 and the projections P_i(q M_i), the independent terms mapped by
    ``mapper`` (in order; the sum is taken in order, so the total does not depend on it)."""
    weights = [1.0] * len(mats) if weights is None else list(weights)

    def term(i: int) -> tuple[torch.Tensor, float]:
        rm = q @ mats[i]
        p = projections[i](rm).to(torch.float64)
        # in place unless the projection handed rm back: at hidden 2048 the streamed run peaked here
        err = (rm.sub_(p) if p.data_ptr() != rm.data_ptr() else rm - p).view(-1)
        return p, float(weights[i]) * float(torch.dot(err, err))

    done = mapper(term, range(len(mats)))
    total = 0.0
    for _, err in done:
        total += err
    return total, [p for p, _ in done]


def frobenius_als(mats: Sequence[torch.Tensor], projections: Sequence[Projection],
                  weights: Sequence[float] | None = None, *, iters: int = 50, tol: float = 1e-6,
                  q0: torch.Tensor | None = None,
                  callback: Callable[[int, float], None] | None = None) -> AlsResult:
    """Alternating least squares for one position (paper eq. 3 with X = I).

    Each iteration: project every rotated matrix onto its class, then set Q = U V^T from
    svd(sum_i w_i P_i M_i^T). The objective cannot increase (each half-step minimises it over its
    variable). Stops after ``iters`` Procrustes steps or when the relative decrease is below ``tol``.
    Column weights (e.g. token frequencies D for an embedding term) are applied by passing M_i D.
    """
    if len(mats) != len(projections):
        raise ValueError(f"{len(mats)} matrices but {len(projections)} projections")
    if not mats:
        raise ValueError("frobenius_als needs at least one matrix")
    mats = _as64(mats)
    d = mats[0].shape[0]
    if any(m.shape[0] != d for m in mats):
        raise ValueError("all stacked matrices must have the hidden dimension as rows")
    weights = [1.0] * len(mats) if weights is None else [float(w) for w in weights]
    dev = mats[0].device
    q = torch.eye(d, dtype=torch.float64, device=dev) if q0 is None else q0.detach().to(dev, torch.float64).clone()
    obj, projs = stack_objective(q, mats, projections, weights)
    result = AlsResult(q=q, objective=[obj], projections=projs)
    for it in range(iters):
        cross = torch.zeros(d, d, dtype=torch.float64, device=dev)
        for m, p, w in zip(mats, projs, weights):
            cross += w * (p @ m.T)
        q_new = procrustes_rotation(cross)
        obj_new, projs_new = stack_objective(q_new, mats, projections, weights)
        result.iterations = it + 1
        if obj_new > obj:  # only possible through an inexact projection: keep the better iterate
            log.debug("ALS objective rose %.6g -> %.6g; stopping", obj, obj_new)
            break
        q, projs = q_new, projs_new
        result.objective.append(obj_new)
        if callback is not None:
            callback(it + 1, obj_new)
        if obj - obj_new <= tol * max(obj, 1e-300):
            obj = obj_new
            break
        obj = obj_new
    result.q, result.projections = q, projs
    return result


def frobenius_als_global(groups: Sequence[tuple[Sequence[torch.Tensor], Sequence[Projection]]],
                         weights: Sequence[Sequence[float]] | None = None, **kwargs) -> AlsResult:
    """One Q shared by every position (``--rotation global``): stack all positions' matrices.

    ``groups`` is one (matrices, projections) pair per position; the result's projections are
    flattened in the same order.
    """
    mats: list[torch.Tensor] = []
    projs: list[Projection] = []
    ws: list[float] = []
    for gi, (m, p) in enumerate(groups):
        mats.extend(m)
        projs.extend(p)
        ws.extend([1.0] * len(m) if weights is None else list(weights[gi]))
    return frobenius_als(mats, projs, ws, **kwargs)


def token_weights(counts: torch.Tensor, mode: str = "sqrt") -> torch.Tensor:
    """Diagonal D of the paper's token-frequency weighting: sqrt(count + 1) (default) or log(count + 2).

    ||(M - M_hat) D||^2 is the embedding's error weighted by how often each token occurs (its
    input Gram matrix is diag(counts) for one-hot inputs).
    """
    c = counts.to(torch.float64)
    if mode == "sqrt":
        return torch.sqrt(c + 1.0)
    if mode == "log":
        return torch.log(c + 2.0)
    raise ValueError(f"unknown token weighting {mode!r}; use 'sqrt' or 'log'")
