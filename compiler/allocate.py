"""Allocation by measured loss: per-matrix kept shares chosen by their estimated effect on the model's loss
under a parameter budget, and the `--max-loss` search for the largest removal a held-out loss allows.

In the rotated basis the dense model is exact, so every compressed linear can be priced on its own. Each
gets a ladder of options: dense, its spec at kept 1/8 .. 7/8, and the uniform plan's spec with the solver's
own factors, each a weighted projection. An option's price is the Kronecker-factored (K-FAC) estimate of
the loss it adds, 0.5 tr(dW^T C dW G), from the input Gram C and the output-gradient Gram G measured on
the dense model (`calibration.collect_curvature`). On each matrix's lower convex hull of (parameters,
price), taking the cheapest price per saved parameter across all matrices, one step at a time, is the
Lagrangian optimum of the relaxed problem; its steps are nested, so every removal is a prefix of one
sequence. The estimate only ranks: what is promised is measured, on held-out calibration text.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.ops import StructuredLinear, structured_from_spec
from procrustes_onnx.ops.planner import family_spec, spec_params

from .adapters import get_module
from .calibration import collect_curvature, damp_gram
from .checkpoint import replace_linear
from .plan import Plan, PlanEntry
from .fanout import Fanout, fan_out
from .weighted import project_weighted

__all__ = ["LADDER_KEPT", "Option", "Ladder", "ladder_options", "build_ladders", "option_for", "greedy_steps",
           "choice_after", "allocate", "swap_in", "heldout_nll", "plan_of", "search_max_loss", "plan_curvature",
           "heldout_scorer", "allocate_measured", "kept_by_role", "ppl_ratio"]

#: kept shares each matrix's ladder offers besides dense and the uniform plan's own spec
LADDER_KEPT = (1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8)

Factors = dict[str, torch.Tensor]


@dataclass
class Option:
    """One way to store a linear: ``spec`` None is the dense (rotated) weight."""

    spec: dict | None
    params: int
    price: float                      # estimated loss added, nats per token
    factors: Factors | None = None
    label: str = ""                   # "dense", "uniform" or the ladder's kept share


@dataclass
class Ladder:
    """The options of one linear, the dense one first."""

    path: str
    role: str
    layer: int | None
    shape: tuple[int, int]
    side: str
    options: list[Option] = field(default_factory=list)

    def hull(self) -> list[Option]:
        """From dense down: the options on the lower convex hull of (params, price), slopes rising."""
        cheapest: dict[int, Option] = {}
        for o in self.options:
            if o.params not in cheapest or o.price < cheapest[o.params].price:
                cheapest[o.params] = o
        hull: list[Option] = []
        for o in sorted(cheapest.values(), key=lambda o: -o.params):
            while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], o):
                hull.pop()
            hull.append(o)
        return hull


def _slope(a: Option, b: Option) -> float:
    """Price per saved parameter going from a to the smaller b."""
    return (b.price - a.price) / max(a.params - b.params, 1)


def _price(dw: torch.Tensor, c: torch.Tensor, g: torch.Tensor) -> float:
    return 0.5 * float(((dw.T @ (c @ dw)) * g).sum())


def option_for(weight: torch.Tensor, gram: torch.Tensor, fisher: torch.Tensor, spec: dict,
               factors: Factors | None = None, label: str = "") -> Option:
    """Price ``spec`` for a weight (in x out); projects it (weighted) unless ``factors`` are given."""
    w = weight.to(torch.float64)
    if factors is None:
        factors = project_weighted(w, gram, spec)
    factors = {k: v.detach().to(torch.float32).contiguous() for k, v in factors.items()}
    approx = structured_from_spec(spec, {k: v.to(torch.float64) for k, v in factors.items()},
                                  dtype=torch.float64).materialize().detach()
    return Option(spec, spec_params(spec), _price(w - approx, gram, fisher), factors, label)


def _ladder_specs(shape: tuple[int, int], uniform: dict, kron_q: int | None, split: str) -> list[tuple[str, dict]]:
    """(label, spec) at every LADDER_KEPT share of the uniform spec's family and Kronecker split, smaller than
    dense, new."""
    seen, out = {repr(uniform)}, []
    for k in LADDER_KEPT:
        s = family_spec(uniform["kind"], *shape, k, split=split, q=kron_q)
        if repr(s) not in seen and spec_params(s) < shape[0] * shape[1]:
            seen.add(repr(s))
            out.append((f"{round(8 * k)}/8", s))
    return out


def ladder_options(weight: torch.Tensor, gram: torch.Tensor, fisher: torch.Tensor, spec: dict, factors: Factors,
                   split: str, kron_q: int | None) -> list[Option]:
    """One linear's options, dense first, from its weight as nn.Linear stores it (out x in, read transposed
    here so the math sees the same strides wherever it runs). Pure: fan-out workers run it."""
    w = weight.t()
    shape = (int(w.shape[0]), int(w.shape[1]))
    options = [Option(None, shape[0] * shape[1], 0.0, None, "dense"),
               option_for(w, gram, fisher, spec, factors, "uniform")]
    options += [option_for(w, gram, fisher, s, label=lab) for lab, s in _ladder_specs(shape, spec, kron_q, split)]
    return options


def build_ladders(model: nn.Module, plan: Plan, uniform_factors: dict[str, Factors], grams: dict[str, torch.Tensor],
                  fishers: dict[str, torch.Tensor], *, kron_q: int | None = 8, kron_split: str = "input",
                  progress: bool = True, fanout: Fanout = Fanout()) -> list[Ladder]:
    """The ladder of every planned linear of a rotated dense model, from its (damped) input Gram and its
    output-gradient Gram; the uniform plan's option reuses the solver's factors. The ladders are independent:
    they fan out over ``fanout`` (Ray) with the same result."""
    bar = tqdm(total=len(plan.entries), desc="loss ladder", unit="matrix", disable=not progress, leave=False)
    items = ((get_module(model, e.path).weight.detach(), grams[e.path], fishers[e.path], e.spec,
              uniform_factors[e.path], e.side if kron_split == "hidden" else "in")   # the plan's own Kronecker split
             for e in plan.entries)
    options = fan_out(ladder_options, items, fanout, shared={"kron_q": kron_q}, on_result=lambda i, _: bar.update())
    bar.close()
    return [Ladder(e.path, e.role, e.layer, e.shape, e.side, opts) for e, opts in zip(plan.entries, options)]


def greedy_steps(ladders: list[Ladder]) -> list[tuple[int, Option]]:
    """The nested sequence (ladder index, option taken) from all dense down every hull, cheapest price
    per saved parameter first."""
    hulls = [lad.hull() for lad in ladders]
    heap = [(_slope(h[0], h[1]), i, 1) for i, h in enumerate(hulls) if len(h) > 1]
    heapq.heapify(heap)
    steps = []
    while heap:
        _, i, k = heapq.heappop(heap)
        steps.append((i, hulls[i][k]))
        if k + 1 < len(hulls[i]):
            heapq.heappush(heap, (_slope(hulls[i][k], hulls[i][k + 1]), i, k + 1))
    return steps


def choice_after(ladders: list[Ladder], steps: list[tuple[int, Option]], n: int) -> list[Option]:
    """The option of every ladder after the first ``n`` greedy steps."""
    chosen = [lad.options[0] for lad in ladders]
    for i, opt in steps[:n]:
        chosen[i] = opt
    return chosen


def allocate(ladders: list[Ladder], steps: list[tuple[int, Option]], budget: int) -> tuple[list[Option], int]:
    """The fewest greedy steps whose linears store at most ``budget`` parameters: (choice, steps taken)."""
    current = [lad.options[0] for lad in ladders]
    total = sum(o.params for o in current)
    for n, (i, opt) in enumerate(steps):
        if total <= budget:
            return choice_after(ladders, steps, n), n
        total += opt.params - current[i].params
        current[i] = opt
    if total <= budget:
        return current, len(steps)
    raise UserError(f"the ladder cannot store the compressed linears in {budget:,} parameters (smallest: {total:,}): "
                    "ask for a smaller removal")


def swap_in(model: nn.Module, ladders: list[Ladder], choice: list[Option], dense: dict[str, nn.Module]) -> None:
    """Put each ladder's chosen option into the model (``dense``: the rotated nn.Linear of every path)."""
    for lad, opt in zip(ladders, choice):
        if opt.spec is None:
            module = dense[lad.path]
        else:
            linear = dense[lad.path]
            matrix = structured_from_spec(opt.spec, {k: v.to(linear.weight.dtype) for k, v in opt.factors.items()},
                                          dtype=linear.weight.dtype)
            module = StructuredLinear(matrix, None if linear.bias is None else linear.bias.detach())
        replace_linear(model, lad.path, module)


@torch.no_grad()
def heldout_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood over ``windows``."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i: i + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return total / max(count, 1)


def plan_of(plan: Plan, ladders: list[Ladder], choice: list[Option]) -> Plan:
    """The uniform ``plan`` with its linears replaced by ``choice`` (dense choices leave the entry list)."""
    base = plan.promised_params - sum(e.params for e in plan.entries)
    entries = [PlanEntry(lad.path, lad.role, lad.layer, lad.shape, lad.side, opt.spec, opt.params)
               for lad, opt in zip(ladders, choice) if opt.spec is not None]
    promised = base + sum(opt.params for opt in choice)
    return Plan(entries, plan.kept, plan.original_params, promised, plan.skip_params, plan.embedding)


def search_max_loss(ladders: list[Ladder], steps: list[tuple[int, Option]], limit: float,
                    score: Callable[[list[Option]], float], *, probes: int = 10,
                    echo: Callable[[str], None] = print) -> tuple[int, float | None, list[dict]]:
    """The most greedy steps whose model's held-out NLL ``score`` stays at or below ``limit``, by bisection
    over the step count (at most ``probes`` scores): (steps, its score or None for none, the probes)."""
    lo, hi, lo_score = 0, len(steps), None
    probed: list[dict] = []
    for _ in range(probes):
        if hi <= lo:
            break
        n = (lo + hi + 1) // 2
        nll = score(choice_after(ladders, steps, n))
        probed.append({"steps": n, "heldout_nll": nll})
        echo(f"  --max-loss probe: {n} of {len(steps)} ladder steps, held-out NLL {nll:.4f} "
             f"({'within' if nll <= limit else 'over'} {limit:.4f})")
        if nll <= limit:
            lo, lo_score = n, nll
        else:
            hi = n - 1
    return lo, lo_score, probed


def plan_curvature(model: nn.Module, plan: Plan, calib: torch.Tensor, damp: float, *, progress: bool = True,
                   input_grams: dict[str, torch.Tensor] | None = None,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(damped input Grams, output-gradient Grams) of every planned linear of a rotated dense model: what
    the ladders are priced with (damped as the solver damps its Grams). ``input_grams`` (already damped,
    in the rotated basis: `solve.rotated_input_grams`) spares the pass from collecting them again."""
    paths = [e.path for e in plan.entries]
    grams, fishers = collect_curvature(model, calib, paths, progress=progress, input_grams=input_grams is None)
    if input_grams is not None:
        return {p: input_grams[p] for p in paths}, fishers
    return {k: damp_gram(v, damp) for k, v in grams.items()}, fishers


def heldout_scorer(model: nn.Module, ladders: list[Ladder], dense: dict[str, nn.Module],
                   heldout: torch.Tensor) -> Callable[[list[Option]], float]:
    """choice -> held-out NLL of the model holding it (swapped in place; the model keeps the last choice)."""
    def score(choice: list[Option]) -> float:
        swap_in(model, ladders, choice, dense)
        return heldout_nll(model, heldout)
    return score


def allocate_measured(model: nn.Module, plan: Plan, uniform_factors: dict[str, Factors], calib: torch.Tensor,
                      heldout: torch.Tensor, config, *, echo: Callable[[str], None] = print,
                      progress: bool = True, input_grams: dict[str, torch.Tensor] | None = None,
                      ) -> tuple[Plan, dict]:
    """Replace the uniform plan of a rotated dense ``model`` by the measured allocation, in place.

    With ``config.ratio``: the greedy allocation storing at most what the uniform plan stores, shipped
    only if its held-out loss beats the uniform plan's (else the uniform plan ships, and says so). With
    ``config.max_loss``: the largest greedy prefix whose held-out perplexity stays within (1 + max_loss) x
    dense; none within it leaves the model dense. Returns the plan of what the model now holds and a
    record of the measurements. ``input_grams``: see `plan_curvature`."""
    paths = [e.path for e in plan.entries]
    dense = {p: get_module(model, p) for p in paths}
    grams, fishers = plan_curvature(model, plan, calib, config.damp, progress=progress, input_grams=input_grams)
    ladders = build_ladders(model, plan, uniform_factors, grams, fishers, kron_q=config.kron_q,
                            kron_split=config.kron_split, progress=progress, fanout=config.fanout)
    del grams, fishers
    steps = greedy_steps(ladders)
    score = heldout_scorer(model, ladders, dense, heldout)
    dense_nll = heldout_nll(model, heldout)
    info: dict = {"heldout_tokens": int(heldout.numel()), "dense_heldout_nll": dense_nll, "ladder_steps": len(steps)}
    if config.max_loss is not None:
        limit = dense_nll + math.log1p(float(config.max_loss))
        n, nll, probes = search_max_loss(ladders, steps, limit, score, echo=echo)
        choice, shipped = choice_after(ladders, steps, n), "measured"
        info.update(max_loss=float(config.max_loss), limit_nll=limit, probes=probes)
        if n == 0:
            nll = dense_nll
            echo(f"--max-loss {config.max_loss}: no ladder step keeps the held-out perplexity within "
                 f"{1 + float(config.max_loss):.3f} x dense; the dense model is returned (every linear dense, "
                 f"{100 * plan_of(plan, ladders, choice).removed:.2f}% removed by folding norms)")
    else:
        budget = sum(e.params for e in plan.entries)
        choice, n = allocate(ladders, steps, budget)
        nll, uniform_nll = score(choice), score([lad.options[1] for lad in ladders])
        info["uniform_heldout_nll"] = uniform_nll
        info["measured_heldout_nll"] = nll
        shipped = "measured" if nll <= uniform_nll else "uniform"
        echo(f"allocation: held-out PPL {ppl_ratio(nll, dense_nll):.3f} x dense measured, "
             f"{ppl_ratio(uniform_nll, dense_nll):.3f} x uniform: the {shipped} plan ships")
        if shipped == "uniform":
            choice, nll = [lad.options[1] for lad in ladders], uniform_nll
    swap_in(model, ladders, choice, dense)
    new_plan = plan_of(plan, ladders, choice)
    info.update(shipped=shipped, steps=n, heldout_nll=nll, heldout_ppl_ratio=ppl_ratio(nll, dense_nll),
                removed=new_plan.removed, kept_by_role=kept_by_role(ladders, choice),
                choices={lad.path: opt.label for lad, opt in zip(ladders, choice)})
    echo(f"allocation ({shipped}): {100 * new_plan.removed:.2f}% removed, held-out PPL "
         f"{info['heldout_ppl_ratio']:.3f} x dense on {heldout.numel():,} held-out calibration tokens; "
         + ", ".join(f"{r} {k:.2f}" for r, k in info["kept_by_role"].items()) + " kept")
    return new_plan, info


def kept_by_role(ladders: list[Ladder], choice: list[Option]) -> dict[str, float]:
    """Stored share of each role's dense parameters under ``choice`` (a summary for the report)."""
    kept: dict[str, list[int]] = {}
    for lad, opt in zip(ladders, choice):
        acc = kept.setdefault(lad.role, [0, 0])
        acc[0] += opt.params
        acc[1] += lad.options[0].params
    return {role: round(a / b, 4) for role, (a, b) in kept.items()}


def ppl_ratio(nll: float, dense_nll: float) -> float:
    return math.exp(nll - dense_nll)
