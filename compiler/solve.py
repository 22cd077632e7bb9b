"""The two solver stages applied to a fused model's positions: gather each position's compressed
linears, run Frobenius ALS (and the weighted stage), and return the rotation with the factors of
every projection, checkpointed per position group so a killed run resumes exactly.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from procrustes_onnx.ops import project_factors, structured_from_spec

from .adapters import get_module
from .calibration import rotate_gram
from .config import CompressionConfig
from .positions import Position, stream_matrix
from .procrustes import frobenius_als
from .tensor_files import save_tensors_atomic
from .weighted import WeightedTerm, balance_weights, project_weighted, weighted_stage

__all__ = ["Projector", "materialize_factors", "TermRef", "group_terms", "saved_factors", "gram_paths", "rotated_input_grams", "GroupTerm", "GroupProblem", "group_problem", "solve_group", "load_group",
           "save_group"]

log = logging.getLogger(__name__)

Factors = dict[str, torch.Tensor]


def materialize_factors(factors: Factors, spec: dict) -> torch.Tensor:
    """The dense float64 matrix of one projection's factors (what the solver scores)."""
    return structured_from_spec(spec, {k: v.to(torch.float64) for k, v in factors.items()},
                                dtype=torch.float64).materialize().detach()


class Projector:
    """Projection closures that remember the factors behind every result still alive, so the final structured
    modules come from exactly the projections the solver scored, whichever iterate it kept. Results are held
    weakly: a projection the solver drops is freed with its factors (at hidden 2048 each is 128 MiB)."""

    def __init__(self) -> None:
        self.known: dict[int, tuple[weakref.ref, Factors]] = {}

    def _remember(self, dense: torch.Tensor, fac: Factors) -> None:
        key = id(dense)

        def forget(ref: weakref.ref) -> None:
            if self.known.get(key, (None,))[0] is ref:
                del self.known[key]
        self.known[key] = (weakref.ref(dense, forget), fac)

    def frobenius(self, path: str, spec: dict, reads: bool):
        """Stacked orientation (hidden dim as rows): writers arrive transposed."""
        def proj(m: torch.Tensor) -> torch.Tensor:
            fac = project_factors(m if reads else m.T, spec)
            dense = materialize_factors(fac, spec)
            out = dense if reads else dense.T
            self._remember(out, fac)
            return out
        return proj

    def weighted(self, path: str, spec: dict):
        """Model orientation (in x out) with the Gram of the input side."""
        def proj(m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            fac = project_weighted(m, c, spec)
            dense = materialize_factors(fac, spec)
            self._remember(dense, fac)
            return dense
        return proj

    def factors_of(self, dense: torch.Tensor | None) -> Factors | None:
        got = self.known.get(id(dense))
        return got[1] if got is not None and dense is not None and got[0]() is dense else None


def _refs(pos: Position, specs: dict[str, dict]):
    return [ref for ref in pos.writers + pos.readers if ref.path in specs]


def gram_paths(positions: list[Position], specs: dict[str, dict]) -> list[str]:
    """Modules whose input Gram the weighted stage needs: each position's first reader (the normed
    stream, shared by all readers) and every compressed writer."""
    paths = []
    for pos in positions:
        if any(r.path in specs for r in pos.readers):
            paths.append(pos.readers[0].path)
        paths.extend(w.path for w in pos.writers if w.path in specs)
    return paths


def _gram(pos: Position, ref, grams: dict[str, torch.Tensor]) -> torch.Tensor:
    return grams[pos.readers[0].path] if ref.reads else grams[ref.path]


def rotated_input_grams(positions: list[Position], specs: dict[str, dict], grams: dict[str, torch.Tensor],
                        rs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The input Gram of every planned linear once the model is rotated, from the solver's Grams of the
    unrotated one: a reader of position p sees x R_p (R_p^T C R_p; a damped C stays damped, as R^T I R = I),
    and a writer's input does not move. Exact, so the ladder needs no second pass for them."""
    out = {}
    for pos, r in zip(positions, rs):
        for ref in _refs(pos, specs):
            gram = _gram(pos, ref, grams)
            out[ref.path] = rotate_gram(gram, r.to(gram.dtype)) if ref.reads else gram
    return out


@dataclass(frozen=True)
class GroupTerm:
    """One compressed linear of a group: its weight as the module stores it (a Linear's is out x in and is
    read transposed, as `stream_matrix` reads it, so the solve sees the same strides wherever it runs),
    its spec and, for the weighted stage, the Gram of its input side."""

    path: str
    reads: bool
    weight: torch.Tensor
    transposed: bool
    spec: dict
    gram: torch.Tensor | None

    def view(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The in x out weight as stored (on the CPU, the model's own tensor: no copy)."""
        w = self.weight.t() if self.transposed else self.weight
        return w.detach().to(device)

    def stream(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The in x out weight in float64."""
        return self.view(device).to(torch.float64)


@dataclass(frozen=True)
class GroupProblem:
    """What solving one group of positions reads, taken out of the model so a worker can be sent it:
    the stream width and one term per compressed linear (writers, then readers, position by position)."""

    width: int
    terms: tuple[GroupTerm, ...]


@dataclass(frozen=True)
class TermRef:
    """One compressed linear of a solve without its tensors: where it is, how it meets the stream, its spec,
    and which Gram it reads (None without Grams). `group_problem` fills in the tensors from the model; the
    out-of-core global solve (`compiler.global_stream`) from work files."""

    path: str
    reads: bool
    transposed: bool
    spec: dict
    gram: str | None


def group_terms(model: nn.Module, sel: list[Position], specs: dict[str, dict], grams: bool) -> list[TermRef]:
    """The terms of a solve of positions ``sel``, in the solve's order (writers, then readers, position by
    position); the model may be on the meta device."""
    terms = []
    for pos in sel:
        for ref in _refs(pos, specs):
            stream_matrix(model, ref)  # a Linear or an Embedding, else TypeError
            gram = (pos.readers[0].path if ref.reads else ref.path) if grams else None
            terms.append(TermRef(ref.path, ref.reads, isinstance(get_module(model, ref.path), nn.Linear),
                                 specs[ref.path], gram))
    return terms


def group_problem(model: nn.Module, sel: list[Position], specs: dict[str, dict],
                  grams: dict[str, torch.Tensor]) -> GroupProblem:
    """The solve of positions ``sel`` as data (the weights are the model's own tensors, not copies)."""
    terms = tuple(GroupTerm(t.path, t.reads, get_module(model, t.path).weight.detach(), t.transposed, t.spec,
                            grams[t.gram] if grams else None) for t in group_terms(model, sel, specs, bool(grams)))
    return GroupProblem(int(stream_matrix(model, sel[0].writers[0]).shape[1]), terms)


def solve_group(problem: GroupProblem, config: CompressionConfig) -> tuple[torch.Tensor, dict[str, Factors], dict]:
    """One rotation R (stream h -> h R) shared by the group's positions, the factors of every compressed
    linear there (in the rotated basis), and a log of the objectives. Pure: fan-out workers run it. The math runs
    on ``config.device``; what it returns is on the CPU."""
    device = torch.device(config.device)
    terms = tuple(replace(t, gram=None if t.gram is None else t.gram.to(device)) for t in problem.terms)
    r = torch.eye(problem.width, dtype=torch.float64, device=device)
    info: dict = {}
    if not terms:
        return r.cpu(), {}, info
    proj = Projector()
    chosen: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    if config.iterations > 0 or config.method == "frobenius":
        weights = {t.path: t.stream(device) for t in terms}  # float64 copies, for this stage only
        mats = [weights[t.path] if t.reads else weights[t.path].T for t in terms]
        projs = [proj.frobenius(t.path, t.spec, t.reads) for t in terms]
        res = frobenius_als(mats, projs, iters=config.iterations, tol=config.tol)
        r = res.q.T.contiguous()
        total = sum(float((m * m).sum()) for m in mats)
        info["frobenius_rel"] = [(x / total) ** 0.5 for x in res.objective]
        chosen = {t.path: p for t, p in zip(terms, res.projections)}
        info["frobenius_seconds"] = round(time.perf_counter() - t0, 1)
        log.info("frobenius: %d matrices, rel error %.4f -> %.4f in %d iterations, %.0f s", len(mats),
                 info["frobenius_rel"][0], info["frobenius_rel"][-1], res.iterations, info["frobenius_seconds"])
        del mats, res, weights
    if config.method == "weighted":
        chosen = {}  # the weighted stage starts afresh at R: the Frobenius projections can go
        wterms = [WeightedTerm(t.view(device), t.gram, proj.weighted(t.path, t.spec), "in" if t.reads else "out",
                               name=t.path) for t in terms]
        balance_weights(wterms, config.balance)
        res_w = weighted_stage(wterms, r, outer_iters=config.weighted_outer, rotation_iters=config.rotation_iters)
        r = res_w.r
        info["weighted_loss"] = res_w.loss
        chosen = {t.path: a for t, a in zip(terms, res_w.approx)}
        info["weighted_seconds"] = round(time.perf_counter() - t0, 1) - info.get("frobenius_seconds", 0.0)
        log.info("weighted: loss %s, %.0f s", " -> ".join(f"{x:.4g}" for x in res_w.loss), info["weighted_seconds"])
    factors = {}
    for t in terms:
        fac = proj.factors_of(chosen.get(t.path))
        if fac is None:  # not a projection this solve made (none today): project again at the final rotation
            w = r.T @ t.stream(device) if t.reads else t.stream(device) @ r
            if config.method == "weighted":      # Frobenius runs have no Grams
                fac = project_weighted(w, rotate_gram(t.gram, r) if t.reads else t.gram, t.spec)
            else:
                fac = project_factors(w, t.spec)
        factors[t.path] = saved_factors(fac)
    return r.cpu(), factors, info


def saved_factors(fac: Factors) -> Factors:
    """A solve's factors as a checkpoint stores them: float32, contiguous, on the CPU."""
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in fac.items()}


def save_group(path: Path, r: torch.Tensor, factors: dict[str, Factors]) -> None:
    """Atomically write one group's rotation (float64) and factors (float32)."""
    tensors = {"r": r.contiguous()}
    for module, fac in factors.items():
        for name, t in fac.items():
            tensors[f"{module}::{name}"] = t
    save_tensors_atomic(tensors, path)


def load_group(path: Path) -> tuple[torch.Tensor, dict[str, Factors]]:
    """A saved group, copied out of the file: load_file's tensors are 16-byte aligned, the allocator's 64, and BLAS
    rounds some products differently on the two, so a resumed run would differ in the last bits."""
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    factors: dict[str, Factors] = {}
    for key, t in tensors.items():
        if "::" in key:
            module, name = key.split("::", 1)
            factors.setdefault(module, {})[name] = t
    return tensors["r"], factors
