"""Shape planner, the one owner of per-matrix specs: Kronecker (r, q) and GS (kl, bl1, bl2 | kr, br1, br2)
configs for a kept fraction, and their exact parameter counts.

Two families of planners share the spec layout and counts here:
- ``plan_kronecker`` / ``plan_gs`` / ``plan_matrix`` (a `MatrixPlan` each): the paper's named configs and
  a search over every valid split, for benchmarks and shape studies;
- ``kron_spec`` / ``gs_spec`` / ``family_spec`` / ``shrink_spec`` (a spec dict each): what the compressor stores, one fixed
  family per structure (q = 8 slabs; kl = kr = k blocks) so ``compiler.plan.build_plan`` can meet a
  parameter ratio by shrinking single matrices one step at a time.

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

__all__ = ["MatrixPlan", "PAPER_FRACTIONS", "parse_kept", "plan_kronecker", "plan_gs", "plan_dense", "plan_matrix",
           "kron_candidates", "gs_candidates", "spec_params", "spec_shapes", "kron_spec", "gs_spec", "family_spec", "shrink_spec"]

PAPER_FRACTIONS = {"3/4": Fraction(3, 4), "5/8": Fraction(5, 8), "1/2": Fraction(1, 2)}
PAPER_KRON = {"3/4": (3, 4), "5/8": (5, 8), "1/2": (1, 2)}                # (r, q)
PAPER_GS_SQUARE = {"3/4": (4, 2), "5/8": (8, 2), "1/2": (4, 4)}          # (kl, kr) for rotated input, out <= in
PAPER_GS_WIDE = {"3/4": (4, 8), "5/8": (4, 4), "1/2": (4, 2)}            # rotated input, out > in (gate/up)
BLOCK_COUNTS = (2, 4, 8, 16, 32, 64)
CLOSE_ENOUGH = 0.01   # among plans this close to the target, the one with the fewest blocks wins


@dataclass(frozen=True)
class MatrixPlan:
    """One planned matrix: its spec (for `structured_from_spec`), exact parameter counts and kept share."""

    spec: dict
    params: int
    dense_params: int

    @property
    def kept(self) -> float:
        return self.params / self.dense_params

    def describe(self) -> str:
        s = self.spec
        return f"{s['kind']} {s['in']}x{s['out']} {spec_shapes(s)}: {self.params} params ({self.kept:.4f} kept)"


def spec_params(spec: dict) -> int:
    """Exact stored parameters of a spec."""
    if spec["kind"] == "kron":
        (m1, n1), (m2, n2) = spec["a_shape"], spec["b_shape"]
        return spec["rank"] * (m1 * n1 + m2 * n2)
    if spec["kind"] == "gs":
        return math.prod(spec["left"]) + math.prod(spec["right"])
    return spec["in"] * spec["out"]


def spec_shapes(spec: dict) -> str:
    """Factor shapes of a spec in one short string, as plan tables and error messages print them."""
    if spec["kind"] == "kron":
        return f"r={spec['rank']} a{tuple(spec['a_shape'])} b{tuple(spec['b_shape'])}"
    if spec["kind"] == "gs":
        return f"L{tuple(spec['left'])} R{tuple(spec['right'])}"
    return "dense"


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


def _kron_factors(n_in: int, n_out: int, rotated: str, r: int, q: int) -> dict:
    """The Kronecker spec of rank r whose rotated side is split into q slabs."""
    d, n = (n_in, n_out) if rotated == "in" else (n_out, n_in)
    a, b = ((q, 1), (d // q, n)) if rotated == "in" else ((1, q), (n, d // q))
    return {"kind": "kron", "rank": r, "a_shape": list(a), "b_shape": list(b), "in": n_in, "out": n_out}


def _gs_factors(n_in: int, n_out: int, kl: int, kr: int, inner: int) -> dict:
    """The GS spec with kl left and kr right blocks and ``inner`` channels between them."""
    return {"kind": "gs", "left": [kl, n_in // kl, inner // kl], "right": [kr, inner // kr, n_out // kr],
            "in": n_in, "out": n_out}


def _kron_plan(n_in: int, n_out: int, rotated: str, r: int, q: int) -> MatrixPlan:
    _check_side(n_in, n_out, rotated)
    spec = _kron_factors(n_in, n_out, rotated, r, q)
    return MatrixPlan(spec, spec_params(spec), n_in * n_out)


def kron_candidates(n_in: int, n_out: int, rotated: str, max_q: int = 64) -> list[MatrixPlan]:
    """Every valid (r, q) with q | d, 2 <= q <= max_q, 1 <= r < q (rank r <= q is the rearranged rank bound)."""
    d, _ = _check_side(n_in, n_out, rotated)
    return [_kron_plan(n_in, n_out, rotated, r, q) for q in range(2, max_q + 1) if d % q == 0 for r in range(1, q)]


def _nearest(cands: list[MatrixPlan], f: Fraction, k: int = 4) -> str:
    best = sorted(cands, key=lambda p: (abs(p.kept - float(f)), p.params))[:k]
    return "; ".join(p.describe() for p in best) or "none"


def plan_kronecker(n_in: int, n_out: int, rotated: str, kept: float | str) -> MatrixPlan:
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


def _gs_plan(n_in: int, n_out: int, kl: int, kr: int, f: Fraction) -> MatrixPlan | None:
    """GS with the given block counts and the inner dim nearest budget f; None if impossible."""
    if n_in % kl or n_out % kr:
        return None
    bl1, br2 = n_in // kl, n_out // kr
    step = math.lcm(kl, kr)
    inner = round(f * n_in * n_out / (bl1 + br2) / step) * step   # nearest, as the paper's configs
    inner = min(inner, kl * kr * min(bl1, br2) // step * step)   # more channels than block rank is waste
    if inner < step:
        return None
    spec = _gs_factors(n_in, n_out, kl, kr, inner)
    return MatrixPlan(spec, spec_params(spec), n_in * n_out)


def gs_candidates(n_in: int, n_out: int, kept: float | str) -> list[MatrixPlan]:
    """All GS plans with power-of-two block counts 2..64 (kl, kr), each at the inner dim nearest the budget."""
    f, _ = parse_kept(kept)
    plans = (_gs_plan(n_in, n_out, kl, kr, f) for kl in BLOCK_COUNTS for kr in BLOCK_COUNTS)
    return [p for p in plans if p is not None]


def plan_gs(n_in: int, n_out: int, rotated: str, kept: float | str) -> MatrixPlan:
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


def _pick(cands: list[MatrixPlan], f: Fraction, size) -> MatrixPlan:
    close = [p for p in cands if abs(p.kept - float(f)) <= CLOSE_ENOUGH]
    if close:
        return min(close, key=lambda p: (size(p), abs(p.kept - float(f))))
    return min(cands, key=lambda p: (abs(p.kept - float(f)), size(p)))


def plan_dense(n_in: int, n_out: int) -> MatrixPlan:
    spec = {"kind": "dense", "in": n_in, "out": n_out}
    return MatrixPlan(spec, n_in * n_out, n_in * n_out)


def plan_matrix(n_in: int, n_out: int, rotated: str, kept: float | str) -> dict[str, MatrixPlan]:
    """Both structured plans for one matrix: {"kron": MatrixPlan, "gs": MatrixPlan}."""
    return {"kron": plan_kronecker(n_in, n_out, rotated, kept), "gs": plan_gs(n_in, n_out, rotated, kept)}


# ---------------------------------------------------------------------------------------------------
# The compressor's specs: one family per structure, each a step ladder that `shrink_spec` walks down.

def kron_spec(n_in: int, n_out: int, side: str, kept: float, q: int | None = 8) -> dict:
    """Paper Kronecker shapes splitting only the rotated side into q slabs, rank r (method §3.2):
    side 'in': a [r, q, 1], b [r, in/q, out]; side 'out': a [r, 1, q], b [r, in, out/q].
    With ``q`` set (default 8, as the paper's 5/8 configs) r = round(kept q); with q None, or a q that
    does not divide the hidden side, q is searched in 4..64 for the kept fraction nearest ``kept``."""
    h, n = (n_in, n_out) if side == "in" else (n_out, n_in)
    if q is not None and h % q == 0:
        best = (0.0, q, min(q, max(1, round(kept * q + 1e-9))))
    else:
        best = None
        for qq in (4, 8, 16, 32, 64):
            if h % qq:
                continue
            cand = min((abs(r * (qq + h * n // qq) / (h * n) - kept), qq, r) for r in range(1, qq + 1))
            if best is None or cand[0] < best[0] - 1e-9:
                best = cand
            if best[0] <= 0.0125:  # the paper's small q whenever it is close enough
                break
    if best is None:
        raise UserError(f"hidden size {h} is not divisible by 4: no Kronecker split; use --structure gs")
    _, q, r = best
    return _kron_factors(n_in, n_out, side, r, q)


def gs_spec(n_in: int, n_out: int, kept: float) -> dict:
    """GS shapes with kl = kr = k blocks (k = 4 when it divides both sides, else 2) and an inner width m,
    a multiple of k^2, so that m (in/k + out/k) params are nearest ``kept`` of in x out."""
    for k in (4, 2, 1):
        if n_in % k == 0 and n_out % k == 0:
            break
    per = n_in // k + n_out // k
    if kept >= 1.0:  # every block (l, r) of full rank: bl2 / kr = min(in, out) / k channels
        m = k * min(n_in, n_out)
    else:
        m = max(k * k, round(kept * n_in * n_out / per / (k * k)) * k * k)
    return _gs_factors(n_in, n_out, k, k, m)


def family_spec(kind: str, n_in: int, n_out: int, kept: float, *, split: str = "in", q: int | None = 8) -> dict:
    """The compressor's spec of structure ``kind`` ('kron' or 'gs') for a kept fraction: the one place a
    kind picks its spec builder (the plan and the accuracy budget's ladders both call it)."""
    if kind == "kron":
        return kron_spec(n_in, n_out, split, kept, q)
    if kind == "gs":
        return gs_spec(n_in, n_out, kept)
    raise UserError(f"structure {kind!r} has no compressor spec family; use kron or gs")


def shrink_spec(spec: dict) -> dict | None:
    """The next smaller spec of the same family (Kronecker rank - 1, GS inner width - k^2), or None."""
    if spec["kind"] == "kron":
        return None if spec["rank"] <= 1 else {**spec, "rank": spec["rank"] - 1}
    if spec["kind"] == "gs":
        (k, bl1, bl2), (kr, _, br2) = spec["left"], spec["right"]
        m = k * bl2 - k * kr
        if m < k * kr or k != kr:
            return None
        return {**spec, "left": [k, bl1, m // k], "right": [kr, m // kr, br2]}
    return None
