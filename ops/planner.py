"""Shape planner: Kronecker (r, q) and GS (kl, bl1, bl2 | kr, br1, br2) configs for a kept fraction.

Only the rotated (hidden) side is split, as in the paper (method.md §3.2, §3.3):
- Kronecker, input side rotated (W d x n): a [r, q, 1], b [r, d/q, n]; output side (W n x d):
  a [r, 1, q], b [r, n, d/q]. Params r*(q + d*n/q), about r/q of d*n. Paper: 3/4 = 3/4, 5/8 = 5/8, 1/2 = 1/2.
- GS: (kl, kr) block counts from the paper's Llama-2-7B configs (q/k: 3/4 (4, 2), 5/8 (8, 2), 1/2 (4, 4);
  gate/up: 3/4 (4, 8), 5/8 (4, 4), 1/2 (4, 2); o and down mirror them), and the inner width
  kl*bl2 = kr*br1 the multiple of lcm(kl, kr) that brings inner*(in/kl + out/kr) nearest the budget.
  This reproduces every Llama-2-7B config listed in method.md §3.3 exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from procrustes_onnx.core.errors import UserError

__all__ = ["Plan", "PAPER_FRACTIONS", "parse_kept", "plan_kronecker", "plan_gs", "plan_dense", "plan_matrix",
           "kron_candidates", "gs_candidates", "spec_params"]

PAPER_FRACTIONS = {"3/4": Fraction(3, 4), "5/8": Fraction(5, 8), "1/2": Fraction(1, 2)}
PAPER_KRON = {"3/4": (3, 4), "5/8": (5, 8), "1/2": (1, 2)}                # (r, q)
PAPER_GS_SQUARE = {"3/4": (4, 2), "5/8": (8, 2), "1/2": (4, 4)}          # (kl, kr) for rotated input, out <= in
PAPER_GS_WIDE = {"3/4": (4, 8), "5/8": (4, 4), "1/2": (4, 2)}            # rotated input, out > in (gate/up)
BLOCK_COUNTS = (2, 4, 8, 16, 32, 64)
CLOSE_ENOUGH = 0.01   # among plans this close to the target, the one with the fewest blocks wins


@dataclass(frozen=True)
class Plan:
    """One planned matrix: its spec (for `structured_from_spec`), exact parameter counts and kept share."""

    spec: dict
    params: int
    dense_params: int

    @property
    def kept(self) -> float:
        return self.params / self.dense_params

    def describe(self) -> str:
        s = self.spec
        shapes = (f"r={s['rank']} a{tuple(s['a_shape'])} b{tuple(s['b_shape'])}" if s["kind"] == "kron"
                  else f"L{tuple(s['left'])} R{tuple(s['right'])}" if s["kind"] == "gs" else "dense")
        return f"{s['kind']} {s['in']}x{s['out']} {shapes}: {self.params} params ({self.kept:.4f} kept)"


def spec_params(spec: dict) -> int:
    """Exact stored parameters of a spec."""
    if spec["kind"] == "kron":
        (m1, n1), (m2, n2) = spec["a_shape"], spec["b_shape"]
        return spec["rank"] * (m1 * n1 + m2 * n2)
    if spec["kind"] == "gs":
        return math.prod(spec["left"]) + math.prod(spec["right"])
    return spec["in"] * spec["out"]


def parse_kept(kept: float | str | Fraction) -> tuple[Fraction, str | None]:
    """(fraction, paper name or None); accepts "3/4", "5/8", "1/2", "0.7" or a number in (0, 1]."""
    name = kept if isinstance(kept, str) and kept in PAPER_FRACTIONS else None
    try:
        f = PAPER_FRACTIONS[name] if name else Fraction(kept).limit_denominator(10_000)
    except (ValueError, TypeError, ZeroDivisionError):
        raise UserError(f"kept fraction {kept!r} is not a number; use e.g. 0.75 or one of "
                        f"{', '.join(PAPER_FRACTIONS)}") from None
    if not 0 < f <= 1:
        raise UserError(f"kept fraction {kept!r} must be in (0, 1]; e.g. 0.75 or {', '.join(PAPER_FRACTIONS)}")
    if name is None:
        name = next((k for k, v in PAPER_FRACTIONS.items() if v == f), None)
    return f, name


def _check_side(n_in: int, n_out: int, rotated: str) -> tuple[int, int]:
    if rotated not in ("in", "out"):
        raise UserError(f"rotated side {rotated!r} must be 'in' (q/k/v/gate/up) or 'out' (o/down)")
    if min(n_in, n_out) < 1:
        raise UserError(f"matrix shape {n_in}x{n_out} must be positive")
    return (n_in, n_out) if rotated == "in" else (n_out, n_in)


def _kron_plan(n_in: int, n_out: int, rotated: str, r: int, q: int) -> Plan:
    d, n = _check_side(n_in, n_out, rotated)
    a, b = ((q, 1), (d // q, n)) if rotated == "in" else ((1, q), (n, d // q))
    spec = {"kind": "kron", "rank": r, "a_shape": list(a), "b_shape": list(b), "in": n_in, "out": n_out}
    return Plan(spec, spec_params(spec), n_in * n_out)


def kron_candidates(n_in: int, n_out: int, rotated: str, max_q: int = 64) -> list[Plan]:
    """Every valid (r, q) with q | d, 2 <= q <= max_q, 1 <= r < q (rank r <= q is the rearranged rank bound)."""
    d, _ = _check_side(n_in, n_out, rotated)
    return [_kron_plan(n_in, n_out, rotated, r, q) for q in range(2, max_q + 1) if d % q == 0 for r in range(1, q)]


def _nearest(cands: list[Plan], f: Fraction, k: int = 4) -> str:
    best = sorted(cands, key=lambda p: (abs(p.kept - float(f)), p.params))[:k]
    return "; ".join(p.describe() for p in best) or "none"


def plan_kronecker(n_in: int, n_out: int, rotated: str, kept: float | str) -> Plan:
    """Kronecker plan: the paper's (r, q) for a named fraction, else the smallest q within CLOSE_ENOUGH
    of the target (else the nearest). UserError with the nearest valid choices if none fits."""
    f, name = parse_kept(kept)
    d, _ = _check_side(n_in, n_out, rotated)
    if f == 1:
        return plan_dense(n_in, n_out)
    cands = kron_candidates(n_in, n_out, rotated)
    if name:
        r, q = PAPER_KRON[name]
        if d % q:
            raise UserError(f"Kronecker {name} needs q={q} to divide the rotated side {d}; nearest valid: "
                            f"{_nearest(cands, f)}")
        return _kron_plan(n_in, n_out, rotated, r, q)
    if not cands:
        raise UserError(f"rotated side {d} has no divisor q in 2..64: no Kronecker split; use GS or dense")
    return _pick(cands, f, lambda p: p.spec["a_shape"][0] * p.spec["a_shape"][1])


def _gs_plan(n_in: int, n_out: int, kl: int, kr: int, f: Fraction) -> Plan | None:
    """GS with the given block counts and the inner dim nearest budget f; None if impossible."""
    if n_in % kl or n_out % kr:
        return None
    bl1, br2 = n_in // kl, n_out // kr
    step = math.lcm(kl, kr)
    inner = round(f * n_in * n_out / (bl1 + br2) / step) * step   # nearest, as the paper's configs
    inner = min(inner, kl * kr * min(bl1, br2) // step * step)   # more channels than block rank is waste
    if inner < step:
        return None
    spec = {"kind": "gs", "left": [kl, bl1, inner // kl], "right": [kr, inner // kr, br2], "in": n_in, "out": n_out}
    return Plan(spec, spec_params(spec), n_in * n_out)


def gs_candidates(n_in: int, n_out: int, kept: float | str) -> list[Plan]:
    """All GS plans with power-of-two block counts 2..64 (kl, kr), each at the inner dim nearest the budget."""
    f, _ = parse_kept(kept)
    plans = (_gs_plan(n_in, n_out, kl, kr, f) for kl in BLOCK_COUNTS for kr in BLOCK_COUNTS)
    return [p for p in plans if p is not None]


def plan_gs(n_in: int, n_out: int, rotated: str, kept: float | str) -> Plan:
    """GS plan: the paper's block counts for a named fraction (mirrored when the output side is rotated),
    else the fewest blocks within CLOSE_ENOUGH of the target (else the nearest)."""
    f, name = parse_kept(kept)
    d, n = _check_side(n_in, n_out, rotated)
    if f == 1:
        return plan_dense(n_in, n_out)
    cands = gs_candidates(n_in, n_out, f)
    if name:
        kl, kr = (PAPER_GS_WIDE if n > d else PAPER_GS_SQUARE)[name]
        if rotated == "out":
            kl, kr = kr, kl
        plan = _gs_plan(n_in, n_out, kl, kr, f)
        if plan is None and not cands:
            raise UserError(f"no GS config exists for a {n_in}x{n_out} matrix (block counts 2..64 must divide "
                            f"both sides); keep it dense or use Kronecker")
        if plan is None:
            raise UserError(f"GS {name} needs kl={kl} | {n_in} and kr={kr} | {n_out}; nearest valid: "
                            f"{_nearest(cands, f)}")
        return plan
    if not cands:
        raise UserError(f"no GS config (block counts 2..64 dividing {n_in} and {n_out}) exists for a "
                        f"{n_in}x{n_out} matrix; keep it dense")
    return _pick(cands, f, lambda p: p.spec["left"][0] + p.spec["right"][0])


def _pick(cands: list[Plan], f: Fraction, size) -> Plan:
    close = [p for p in cands if abs(p.kept - float(f)) <= CLOSE_ENOUGH]
    if close:
        return min(close, key=lambda p: (size(p), abs(p.kept - float(f))))
    return min(cands, key=lambda p: (abs(p.kept - float(f)), size(p)))


def plan_dense(n_in: int, n_out: int) -> Plan:
    spec = {"kind": "dense", "in": n_in, "out": n_out}
    return Plan(spec, n_in * n_out, n_in * n_out)


def plan_matrix(n_in: int, n_out: int, rotated: str, kept: float | str) -> dict[str, Plan]:
    """Both structured plans for one matrix: {"kron": Plan, "gs": Plan}."""
    return {"kron": plan_kronecker(n_in, n_out, rotated, kept), "gs": plan_gs(n_in, n_out, rotated, kept)}
