"""A whole model's plan: which linears get which structured shapes for a `CompressionConfig` (the per-matrix
shapes come from `ops.planner`; this module resolves them against a model's linears and a removal target)."""

from __future__ import annotations

from dataclasses import dataclass

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.ops.planner import family_spec, shrink_spec, spec_params, spec_shapes

from .config import PRESETS, CompressionConfig

__all__ = ["PlanEntry", "Plan", "build_plan"]


@dataclass
class PlanEntry:
    """One linear: module path, role, layer, (in, out), rotated side, spec and stored parameters."""

    path: str
    role: str
    layer: int | None
    shape: tuple[int, int]
    side: str
    spec: dict
    params: int

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class Plan:
    """A whole model's plan: one `PlanEntry` per compressed linear and the parameter totals it promises
    (per-matrix shapes come from `ops.planner`)."""

    entries: list[PlanEntry]
    kept: float                 # per-matrix kept fraction the plan was built for
    original_params: int        # the model before any surgery (tied weights once)
    promised_params: int        # what the saved checkpoint will store
    skip_params: int = 0
    embedding: dict | None = None   # low-rank token embedding: path, shape [V, d], rank, params, tied
    allocation: dict | None = None  # measured allocation: what it chose and the held-out losses it measured

    @property
    def removed(self) -> float:
        return 1.0 - self.promised_params / self.original_params

    def table(self) -> str:
        """Per matrix type: structure, shapes, parameters (printed before any work starts)."""
        rows: dict[tuple, list[PlanEntry]] = {}
        for e in self.entries:
            key = (e.role, e.spec["kind"], e.shape, spec_shapes(e.spec))
            rows.setdefault(key, []).append(e)
        def line(role, kind, shape, shapes, count, params) -> str:
            return (f"{role:6} {kind:5} {f'{shape[0]}x{shape[1]}':>10} {shapes:34} {count:5d} {params:9d} "
                    f"{params / (shape[0] * shape[1]):6.3f}")

        lines = [f"{'role':6} {'kind':5} {'shape':>10} {'factors':34} {'count':>5} {'params':>9} {'kept':>6}"]
        lines += [line(role, kind, shape, shapes, len(es), es[0].params)
                  for (role, kind, shape, shapes), es in rows.items()]
        if self.embedding is not None:
            e = self.embedding
            lines.append(line("embed+head" if e["tied"] else "embed", "lowrk", e["shape"], f"rank {e['rank']}", 1,
                              e["params"]))
        lines.append(f"skip matrices: {self.skip_params} params; stored {self.promised_params:,} of "
                     f"{self.original_params:,} -> {100 * self.removed:.2f}% removed")
        return "\n".join(lines)


def build_plan(candidates: list[tuple[str, str, int | None, tuple[int, int], str]], config: CompressionConfig,
               original_params: int, fixed_params: int, skip_params: int = 0) -> Plan:
    """Choose specs for ``candidates`` (path, role, layer, (in, out), rotated side), all compressed
    (dense ones already filtered out and counted in ``fixed_params``, the stored parameters of
    everything else). With ``config.ratio`` the per-matrix kept fraction is searched so the stored
    total removes the fraction nearest the target; with a preset it is the preset's."""

    def make(kept: float) -> Plan:
        entries = []
        for path, role, layer, shape, side in candidates:
            kind = config.structure_of(role, layer)
            split = side if config.kron_split == "hidden" else "in"
            share = config.kept.get(role, kept)
            spec = family_spec(kind, *shape, share, split=split, q=config.kron_q)
            entries.append(PlanEntry(path, role, layer, shape, side, spec, spec_params(spec)))
        return _finish(entries, kept)

    def _finish(entries: list[PlanEntry], kept: float) -> Plan:
        promised = fixed_params + skip_params + sum(e.params for e in entries)
        return Plan(entries, kept, original_params, promised, skip_params)

    if config.preset is not None:
        return make(PRESETS[config.preset])
    target = float(config.plan_ratio)
    # the smallest uniform plan that still keeps too much, then shrink single matrices in allocation order
    plans = [make(i / 200) for i in range(200, 9, -1)]
    start = max((p for p in plans if p.removed <= target), key=lambda p: p.removed, default=plans[0])
    entries = list(start.entries)
    order = sorted((i for i in range(len(entries)) if entries[i].role not in config.kept),
                   key=lambda i: _priority(entries[i], config.allocation, candidates))
    best = _finish(list(entries), start.kept)
    while best.removed < target:
        changed = False
        for i in order:
            smaller = shrink_spec(entries[i].spec)
            if smaller is None:
                continue
            e = entries[i]
            entries[i] = PlanEntry(e.path, e.role, e.layer, e.shape, e.side, smaller, spec_params(smaller))
            changed = True
            plan = _finish(list(entries), start.kept)
            if plan.removed >= target:
                best = min((best, plan), key=lambda p: abs(p.removed - target))
                break
            best = plan
        if not changed:
            break
    if abs(best.removed - target) > 0.02:
        raise UserError(f"--ratio {target} cannot be reached (nearest: {best.removed:.3f} removed with "
                        f"these matrices compressed): compress more roles or pick a ratio near {best.removed:.2f}")
    return best


def _priority(entry: PlanEntry, allocation: str, candidates) -> tuple:
    """Which matrices give up parameters first: 'middle' (layers nearest the middle first; the first
    and last layers are the most sensitive), 'first' or 'last'."""
    layers = [c[2] for c in candidates if c[2] is not None]
    top = max(layers) if layers else 0
    layer = entry.layer if entry.layer is not None else top
    key = {"first": layer, "last": -layer}.get(allocation, abs(layer - top / 2))  # measured: middle first
    return (key, layer, entry.role)
