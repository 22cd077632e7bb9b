"""Weighted ProcrustesGPT stage (method.md §3.4): activation-weighted projections and a weighted
orthogonal Procrustes step for one residual position.

Model orientation (in x out, ``y = x W``); the position's stream is rotated as h -> h R, so a
writing weight becomes W R and a reading weight R^T W. With Gram matrices C = X^T X of each
linear's input (in the unrotated basis), the loss (paper eq. 3, squared norms) is

    f(R, W_hat) = sum_out w ||X (W R - W_hat)||^2 + sum_in w ||X (W - R W_hat)||^2
                = K - 2 tr(R^T G) + sum_in w tr(R^T C R W_hat W_hat^T)

with G = sum_out w W^T C W_hat + sum_in w C W W_hat^T. Given W_hat, R is found by Riemannian
gradient descent on O(d) with the Cayley retraction (Wen & Yin 2013), Barzilai-Borwein steps and
a monotone Armijo backtrack, so the loss never increases; given R, each W_hat is a weighted
projection (kept only if it lowers the loss). The Frobenius stage's rotation q is R^T.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from procrustes_onnx.ops import project_factors

from .fanout import map_threads
from .procrustes import polar

__all__ = ["WeightedTerm", "WeightedResult", "WeightedProjection", "weighted_loss", "term_loss", "project_weighted",
           "solve_rotation", "rotation_descent", "weighted_stage", "balance_weights", "balance_scales", "output_norm",
           "QuadraticParts"]

log = logging.getLogger(__name__)

WeightedProjection = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(M in x out, C = Gram of the input side, in x in) -> nearest structured W_hat in ||C^{1/2}(M - W_hat)||."""


@dataclass
class WeightedTerm:
    """One compressed linear at a position: ``kind`` 'in' (reads the position, W is d x n) or 'out'
    (writes it, W is n x d), its input Gram matrix ``gram``, its weighted projection and weight."""

    weight: torch.Tensor
    gram: torch.Tensor
    project: WeightedProjection
    kind: str
    scale: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("in", "out"):
            raise ValueError(f"term kind must be 'in' or 'out', not {self.kind!r}")
        self.weight = self.weight.detach()
        self.gram = self.gram.detach().to(torch.float64)

    def w64(self) -> torch.Tensor:
        """The weight in float64, made on use: the term keeps the caller's tensor (a float32 model weight is not
        copied), and float64 of it is exact, so every product is the same as with a stored float64 copy."""
        return self.weight.to(torch.float64)

    def target(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(matrix to project, Gram of its input side) under rotation r."""
        if self.kind == "out":
            return self.w64() @ r, self.gram
        return r.T @ self.w64(), r.T @ self.gram @ r


@dataclass
class WeightedResult:
    r: torch.Tensor
    approx: list[torch.Tensor]
    loss: list[float] = field(default_factory=list)  # after every half-step, first at the start


def term_loss(term: WeightedTerm, r: torch.Tensor, approx: torch.Tensor) -> float:
    """w ||X (W R - W_hat)||^2 or w ||X (W - R W_hat)||^2 for one term."""
    diff = (term.w64() @ r).sub_(approx) if term.kind == "out" else (r @ approx).neg_().add_(term.w64())
    return term.scale * float(torch.dot(diff.view(-1), (term.gram @ diff).view(-1)))  # no elementwise temporaries


def weighted_loss(terms: Sequence[WeightedTerm], r: torch.Tensor, approx: Sequence[torch.Tensor]) -> float:
    return sum(term_loss(t, r, a) for t, a in zip(terms, approx))


class QuadraticParts:
    """G, the (C, P) pairs of the quadratic part (grouped by shared Gram) and the constant K, added one term at
    a time, so an out-of-core solve (`compiler.global_stream`) builds them with one term in memory. ``key`` names
    the term's Gram (readers of one position share it); the first term of a key keeps its Gram."""

    def __init__(self, d: int, device: torch.device | str = "cpu") -> None:
        self.g = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.const = 0.0
        self.groups: dict = {}

    def add(self, t: WeightedTerm, a: torch.Tensor, key) -> None:
        w = t.w64()
        cw = t.gram @ w
        self.const += t.scale * float((w * cw).sum())
        if t.kind == "out":
            ca = t.gram @ a
            self.g += t.scale * (cw.T @ a)
            self.const += t.scale * float((a * ca).sum())
        else:
            self.g += t.scale * (cw @ a.T)
            d = self.g.shape[0]
            entry = self.groups.setdefault(key, [t.gram, torch.zeros(d, d, dtype=torch.float64, device=self.g.device)])
            entry[1] += t.scale * (a @ a.T)

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(c, p) for c, p in self.groups.values()]


def _quadratic_parts(terms, approx):
    """G, the (C, P) pairs of the quadratic part (grouped by shared Gram), and the constant K."""
    d = terms[0].weight.shape[1] if terms[0].kind == "out" else terms[0].weight.shape[0]
    parts = QuadraticParts(d, terms[0].weight.device)
    for t, a in zip(terms, approx):
        parts.add(t, a, (t.gram.data_ptr(), tuple(t.gram.shape)))
    return parts.g, parts.pairs(), parts.const


def _f_and_grad(r, g, quads, const):
    f = const - 2.0 * float((r * g).sum())
    grad = -2.0 * g
    for c, p in quads:
        crp = c @ r @ p
        f += float((r * crp).sum())
        grad = grad + 2.0 * crp
    return f, grad


def _cayley(r: torch.Tensor, a: torch.Tensor, tau: float) -> torch.Tensor:
    eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
    return torch.linalg.solve(eye + 0.5 * tau * a, (eye - 0.5 * tau * a) @ r)


def solve_rotation(terms: Sequence[WeightedTerm], approx: Sequence[torch.Tensor], r0: torch.Tensor, *,
                   iters: int = 200, tol: float = 1e-7) -> tuple[torch.Tensor, list[float]]:
    """Minimise the weighted loss over orthogonal R for fixed W_hat; returns R and the loss trace.

    Riemannian gradient descent with the Cayley retraction Y(tau) = (I + tau/2 A)^{-1}(I - tau/2 A) R,
    A = E R^T - R E^T (E the Euclidean gradient), BB step sizes and Armijo backtracking.
    """
    g, quads, const = _quadratic_parts(terms, approx)
    return rotation_descent(g, quads, const, r0, iters=iters, tol=tol)


def rotation_descent(g: torch.Tensor, quads, const: float, r0: torch.Tensor, *, iters: int = 200,
                     tol: float = 1e-7) -> tuple[torch.Tensor, list[float]]:
    """`solve_rotation` on the loss's parts: ``quads`` is iterated once per evaluation, so it may read its (C, P)
    pairs from disk as it goes."""
    r = r0.detach().to(torch.float64).clone()
    f, e = _f_and_grad(r, g, quads, const)
    trace = [f]
    tau = None
    prev = None
    for _ in range(iters):
        a = e @ r.T - r @ e.T
        gnorm2 = float((a * a).sum())
        if gnorm2 <= 1e-30:
            break
        if tau is None:
            tau = 1.0 / max(gnorm2 ** 0.5, 1e-30)
        elif prev is not None:  # Barzilai-Borwein on the skew gradients
            s, y = r - prev[0], a - prev[1]
            sy = abs(float((s * y).sum()))
            tau = float((s * s).sum()) / sy if sy > 0 else tau
        tau = min(tau, 2.0 / max(gnorm2 ** 0.5, 1e-30))  # ||tau A / 2|| <= 1: a well-conditioned Cayley solve
        accepted = False
        for _ in range(30):
            r_new = _cayley(r, a, tau)
            f_new, e_new = _f_and_grad(r_new, g, quads, const)
            if f_new <= f - 1e-4 * tau * 0.5 * gnorm2:
                accepted = True
                break
            tau *= 0.5
        if not accepted:
            break
        prev = (r, a)
        decrease = f - f_new
        r, f, e = r_new, f_new, e_new
        trace.append(f)
        if decrease <= tol * max(abs(f), 1e-300):
            break
    # re-orthogonalise against drift from repeated solves
    return polar(r), trace


def weighted_stage(terms: Sequence[WeightedTerm], r0: torch.Tensor | None = None,
                   approx0: Sequence[torch.Tensor] | None = None, *, outer_iters: int = 1,
                   rotation_iters: int = 200, tol: float = 1e-7) -> WeightedResult:
    """Alternate weighted projections and the weighted Procrustes step (paper: 1 outer iteration:
    project, solve for R, project). ``approx0`` (e.g. the Frobenius stage's projections mapped to
    model orientation) is kept wherever it beats the weighted projection, so the result's loss is
    never above the starting point's."""
    terms = list(terms)
    if not terms:
        raise ValueError("weighted_stage needs at least one term")
    d = terms[0].weight.shape[1] if terms[0].kind == "out" else terms[0].weight.shape[0]
    dev = terms[0].weight.device
    r = torch.eye(d, dtype=torch.float64, device=dev) if r0 is None else r0.detach().to(dev, torch.float64)
    approx = [None] * len(terms) if approx0 is None else [a.detach().to(torch.float64) for a in approx0]
    trace: list[float] = []

    losses = [None if a is None else term_loss(t, r, a) for t, a in zip(terms, approx)]

    def candidate(i: int) -> None:  # kept at once if it is better, else dropped: one candidate per thread alive
        cand = terms[i].project(*terms[i].target(r)).to(torch.float64)
        cand_loss = term_loss(terms[i], r, cand)
        if losses[i] is None or cand_loss <= losses[i]:
            approx[i], losses[i] = cand, cand_loss

    def project_all() -> None:  # the terms are independent: side by side on this process's threads
        map_threads(candidate, range(len(terms)))
        trace.append(sum(losses))

    if approx0 is not None:
        trace.append(sum(losses))
    for _ in range(outer_iters):
        project_all()
        r, inner = solve_rotation(terms, approx, r, iters=rotation_iters, tol=tol)
        losses = [term_loss(t, r, a) for t, a in zip(terms, approx)]  # at the new R (the solver's f, per term)
        trace.append(sum(losses))
        log.debug("weighted rotation: %d steps, %.6g -> %.6g", len(inner) - 1, inner[0], inner[-1])
    project_all()
    return WeightedResult(r=r, approx=list(approx), loss=trace)


def balance_weights(terms: Sequence[WeightedTerm], mode: str = "relative") -> None:
    """Set each term's scale in place. 'relative': 1/||X W||^2, so each linear's relative output error
    counts equally; 'paper': inputs 1, outputs mean_in ||X W_in||^2 / ||X W_out||^2; 'none': 1."""
    scales = balance_scales([output_norm(t) for t in terms], [t.kind for t in terms], mode)
    for t, s in zip(terms, scales):
        t.scale = s


def output_norm(t: WeightedTerm) -> float:
    """||X W||^2 of one term, as `balance_scales` reads it."""
    w = t.w64()
    return float((w * (t.gram @ w)).sum())


def balance_scales(norms: Sequence[float], kinds: Sequence[str], mode: str = "relative") -> list[float]:
    """The scales of `balance_weights` from each term's ||X W||^2 and kind ('in' or 'out')."""
    if mode == "none":
        return [1.0] * len(norms)
    if mode == "relative":
        return [1.0 / max(n, 1e-300) for n in norms]
    if mode == "paper":
        ins = [n for k, n in zip(kinds, norms) if k == "in"]
        mean_in = sum(ins) / len(ins) if ins else 1.0
        return [1.0 if k == "in" else mean_in / max(n, 1e-300) for k, n in zip(kinds, norms)]
    raise ValueError(f"unknown balance mode {mode!r}; use relative, paper or none")


def project_weighted(m: torch.Tensor, gram: torch.Tensor, spec: dict, *, sweeps: int | None = None,
                     ) -> dict[str, torch.Tensor]:
    """Factors of the structured W minimising ||C^{1/2}(M - W)||_F (M in x out, C in x in), started at the
    Frobenius projection and never worse than it. The solver's one entry: float64, detached, and ops'
    weighted projection of the spec's kind (`project_kronecker_weighted`, `project_gs_weighted`), which owns
    the algorithm; ``sweeps`` None keeps each projection's default."""
    kw = {} if sweeps is None else {"sweeps": sweeps}
    return project_factors(m.detach().to(torch.float64), spec, gram=gram.detach().to(torch.float64), **kw)
