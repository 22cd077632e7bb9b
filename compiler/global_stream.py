"""The global rotation solved out of core: `solve_group` over every position's linears, with each linear's
weight, Gram and current projection read from work files when the solve reaches it.

`solve_group` holds every term at once (at 1.5B: every weight in float64, two iterates of every projection, about
14 GiB of Grams). Here a pass over the terms loads a few terms (one per torch thread), projects them, adds what
the step needs (the Procrustes cross matrix, the weighted loss's G, (C, P) pairs and constant) and drops them;
projections are kept as factors on disk. The same operations in the same order on the same threads as `solve_group` (the projections of
a few terms side by side, one per torch thread, as `map_threads` runs them there), so the same bits
(tests/test_streamed.py). Each pass reads every term once: a Frobenius iteration is one pass, the weighted stage
three passes per outer iteration plus one per rotation-descent evaluation for the (C, P) pairs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from procrustes_onnx.ops import project_factors

from .config import CompressionConfig
from .fanout import map_threads
from .procrustes import procrustes_rotation
from .solve import Factors, GroupTerm, TermRef, materialize_factors
from .tensor_files import load_aligned, save_torch_atomic
from .weighted import QuadraticParts, WeightedTerm, balance_scales, output_norm, project_weighted, rotation_descent, term_loss

__all__ = ["TermStore", "solve_global_stored"]

log = logging.getLogger(__name__)


class TermStore:
    """Work files of the out-of-core solve under ``root``: each term's weight as its module stores it, each Gram
    once (readers of a position share theirs), and projections as factors in named slots."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("weights", "grams", "slots"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def put_weight(self, term: TermRef, weight: torch.Tensor) -> None:
        save_torch_atomic(weight.detach().contiguous().clone(), self.root / "weights" / f"{term.path}.pt")

    def put_gram(self, key: str, gram: torch.Tensor) -> None:
        save_torch_atomic(gram, self.root / "grams" / f"{key}.pt")

    def gram(self, key: str) -> torch.Tensor:
        return load_aligned(self.root / "grams" / f"{key}.pt")

    def term(self, t: TermRef, device: torch.device | str = "cpu", gram: bool = True) -> GroupTerm:
        """A stored term as `group_problem` gives it (without its Gram unless ``gram``)."""
        gram = None if t.gram is None or not gram else self.gram(t.gram).to(device)
        return GroupTerm(t.path, t.reads, load_aligned(self.root / "weights" / f"{t.path}.pt"), t.transposed, t.spec, gram)

    def put_factors(self, slot: str, t: TermRef, factors: Factors) -> None:
        folder = self.root / "slots" / slot
        folder.mkdir(exist_ok=True)
        save_torch_atomic({k: v.detach() for k, v in factors.items()}, folder / f"{t.path}.pt")

    def factors(self, slot: str, t: TermRef) -> Factors:
        return load_aligned(self.root / "slots" / slot / f"{t.path}.pt")

    def put_solution(self, r: torch.Tensor, slot: str) -> None:
        """The solve's end: a later run over the same work folder skips the gathering pass and the solve."""
        save_torch_atomic({"r": r, "slot": slot}, self.root / "solution.pt")

    def solution(self) -> tuple[torch.Tensor, str] | None:
        file = self.root / "solution.pt"
        if not file.exists():
            return None
        got = load_aligned(file)
        return got["r"], got["slot"]


class _Pairs:
    """The weighted loss's (C, P) pairs on disk, read one pair at a time at each evaluation. A group's P is
    written once the terms move on to the next Gram (a position's readers are consecutive), so the pass holds
    one P and one C, not every position's."""

    def __init__(self, store: TermStore, device: torch.device) -> None:
        self.store, self.device, self.files = store, device, []

    def spill(self, parts: QuadraticParts, keep: str | None = None) -> None:
        """Write and drop every complete group of ``parts`` (all but ``keep``, the current term's Gram)."""
        for key in [k for k in parts.groups if k != keep]:
            if any(k == key for k, _ in self.files):
                raise ValueError(f"the readers of Gram {key} are not consecutive in the term order")
            file = self.store.root / f"pair{len(self.files):05d}.pt"
            save_torch_atomic(parts.groups.pop(key)[1], file)
            self.files.append((key, file))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for key, file in self.files:
            yield self.store.gram(key).to(self.device), load_aligned(file).to(self.device)


def _chunks(terms: Sequence[TermRef]) -> Iterator[Sequence[TermRef]]:
    """Terms a few at a time, one per torch thread: their projections run side by side (`map_threads`, as the
    in-memory solve runs them), so a pass holds that many terms, not one."""
    width = max(1, torch.get_num_threads())
    for i in range(0, len(terms), width):
        yield terms[i:i + width]


def _frobenius_pass(store: TermStore, terms: Sequence[TermRef], q: torch.Tensor, slot: str | None, device,
                    ) -> tuple[float, torch.Tensor, float]:
    """sum ||q M - P(q M)||^2, the Procrustes cross matrix sum P M^T, and sum ||M||^2, a few terms in memory; the
    projections' factors go to ``slot`` unless it is None (`stack_objective` and `frobenius_als`' step, term by
    term, in the same order)."""
    total, norm = 0.0, 0.0
    cross = torch.zeros_like(q)
    for chunk in _chunks(terms):
        mats = [store.term(t, gram=False).stream(device) for t in chunk]
        mats = [m if t.reads else m.T for t, m in zip(chunk, mats)]

        def project(j: int):
            t, rm = chunk[j], q @ mats[j]
            fac = project_factors(rm if t.reads else rm.T, t.spec)
            dense = materialize_factors(fac, t.spec)
            p = (dense if t.reads else dense.T).to(torch.float64)
            err = rm.sub_(p).view(-1)
            return fac, p, 1.0 * float(torch.dot(err, err))

        for t, m, (fac, p, err) in zip(chunk, mats, map_threads(project, range(len(chunk)))):
            total += err
            if slot is not None:
                store.put_factors(slot, t, fac)
            cross += 1.0 * (p @ m.T)
            norm += float((m * m).sum())
    return total, cross, norm


def _frobenius(store, terms, config, width: int, device) -> tuple[torch.Tensor, str | None, list[float]]:
    """`frobenius_als` with each iterate's projections on disk (two slots; none when the weighted stage follows,
    which starts afresh). Returns R = Q^T, the slot holding the kept iterate's factors and the relative errors."""
    q = torch.eye(width, dtype=torch.float64, device=device)
    slots = ["frob-a", "frob-b"] if config.method == "frobenius" else [None, None]
    obj, cross, total = _frobenius_pass(store, terms, q, slots[0], device)
    objective = [obj]
    for _ in range(config.iterations):
        q_new = procrustes_rotation(cross)
        obj_new, cross_new, _ = _frobenius_pass(store, terms, q_new, slots[1], device)
        if obj_new > obj:
            break
        q, cross = q_new, cross_new
        slots.reverse()
        objective.append(obj_new)
        if obj - obj_new <= config.tol * max(obj, 1e-300):
            break
        obj = obj_new
    return q.T.contiguous(), slots[0], [(x / total) ** 0.5 for x in objective]


def _weighted(store, terms, config, r, device) -> tuple[torch.Tensor, list[float]]:
    """`weighted_stage` from ``r`` with no starting projections; the kept projections' factors end in slot
    'weighted'."""
    kinds = ["in" if t.reads else "out" for t in terms]

    scales = [1.0] * len(terms)

    def load(i: int, t: TermRef) -> WeightedTerm:
        g = store.term(t, device)
        return WeightedTerm(g.view(device), g.gram, None, kinds[i], scale=scales[i], name=t.path)

    scales = balance_scales([output_norm(load(i, t)) for i, t in enumerate(terms)], kinds, config.balance)
    losses: list[float | None] = [None] * len(terms)
    trace: list[float] = []

    def project_all(r: torch.Tensor) -> None:
        index = {t.path: i for i, t in enumerate(terms)}
        for chunk in _chunks(terms):
            loaded = [load(index[t.path], t) for t in chunk]

            def candidate(j: int):  # as `weighted_stage` maps each candidate
                fac = project_weighted(*loaded[j].target(r), chunk[j].spec)
                return fac, term_loss(loaded[j], r, materialize_factors(fac, chunk[j].spec).to(torch.float64))

            for t, (fac, cand_loss) in zip(chunk, map_threads(candidate, range(len(chunk)))):
                i = index[t.path]
                if losses[i] is None or cand_loss <= losses[i]:
                    store.put_factors("weighted", t, fac)
                    losses[i] = cand_loss
            del loaded
        trace.append(sum(losses))

    def approx(t: TermRef) -> torch.Tensor:
        return materialize_factors(store.factors("weighted", t), t.spec)

    for _ in range(config.weighted_outer):
        project_all(r)
        parts, pairs = QuadraticParts(r.shape[0], device), _Pairs(store, device)
        for i, t in enumerate(terms):
            parts.add(load(i, t), approx(t), t.gram)
            pairs.spill(parts, keep=t.gram)
        pairs.spill(parts)
        r, _ = rotation_descent(parts.g, pairs, parts.const, r, iters=config.rotation_iters)
        del parts
        losses = []
        for i, t in enumerate(terms):
            wt = load(i, t)
            losses.append(term_loss(wt, r, approx(t)))
        trace.append(sum(losses))
    project_all(r)
    return r, trace


def solve_global_stored(store: TermStore, terms: Sequence[TermRef], width: int, config: CompressionConfig,
                        ) -> tuple[torch.Tensor, str, dict]:
    """`solve_group` over ``terms`` read from ``store``: the rotation R (CPU, float64), the slot that holds the
    chosen factors of every term, and the solve's log."""
    device = torch.device(config.device)
    r = torch.eye(width, dtype=torch.float64, device=device)
    info: dict = {}
    slot = ""
    t0 = time.perf_counter()
    if config.iterations > 0 or config.method == "frobenius":
        r, slot, info["frobenius_rel"] = _frobenius(store, terms, config, width, device)
        info["frobenius_seconds"] = round(time.perf_counter() - t0, 1)
        log.info("frobenius (out of core): %d matrices, rel error %.4f -> %.4f, %.0f s", len(terms),
                 info["frobenius_rel"][0], info["frobenius_rel"][-1], info["frobenius_seconds"])
    if config.method == "weighted":
        r, info["weighted_loss"] = _weighted(store, terms, config, r, device)
        slot = "weighted"
        info["weighted_seconds"] = round(time.perf_counter() - t0, 1) - info.get("frobenius_seconds", 0.0)
    return r.cpu(), slot, info
