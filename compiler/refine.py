"""Sequential refinement: re-fit every structured linear, layer by layer, on the inputs it receives in
the *compressed* model, once the rotation is fixed.

The paper's weighted stage measures every Gram on the dense model, so each layer is fitted as if the
layers before it were exact. Here the calibration batches run through the compressed model one layer at
a time (as SliceGPT does for its PCA); for each group of linears sharing one input (q/k/v, o, gate/up,
down) we collect, over compressed inputs X_c and dense inputs X_d of the same tokens,

    C = X_c^T X_c + lam I,        D = X_c^T X_d        (lam = damp * mean diag, as in the Grams)

and re-project W (the rotated dense weight) onto its structure in the norm of C. With ``correct`` the
target is first moved to W' = C^{-1} (D W + lam W), the minimiser of ||X_c W' - X_d W||^2 + lam||W' - W||^2:
the fit then also undoes the error the earlier layers pushed into X_c (W' = W when X_c = X_d), and

    ||X_c W_hat - X_d W||^2 + lam ||W_hat - W||^2 = ||C^{1/2} (W' - W_hat)||^2 + const.

A refit is kept only if it lowers that loss below the current factors', so no linear gets worse on the
calibration data. Each layer's factors are saved to ``work`` as it finishes, so a killed run resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from procrustes_onnx.ops import StructuredLinear, structured_from_spec

from .adapters import get_adapter
from .calibration import StopForward, capture_layer_inputs
from .tensor_files import save_tensors_atomic
from .weighted import project_weighted

__all__ = ["REFINE_MODES", "refine_sequential"]

log = logging.getLogger(__name__)

REFINE_MODES = ("none", "sequential", "corrected")


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _groups(layer: nn.Module, names: list[str], x: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """``names`` in call order, consecutive modules that receive the same input tensor grouped together.
    The inputs are held (not just their addresses), so a freed buffer reused at the same address cannot
    merge two groups."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [layer.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: calls.append((n, args[0]))) for n in names]
    try:
        layer(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    last = None
    for name, tensor in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and tensor is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = tensor
    return groups


def _input_of(layer: nn.Module, name: str, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input of ``layer.name`` when the layer runs on ``x`` (the pass stops there)."""
    got: list[torch.Tensor] = []

    def hook(_m, args):
        got.append(args[0].detach())
        raise StopForward

    handle = layer.get_submodule(name).register_forward_pre_hook(hook)
    try:
        layer(x, **kwargs)
    except StopForward:
        pass
    finally:
        handle.remove()
    return got[0].reshape(-1, got[0].shape[-1]).to(torch.float64)


def _fit_loss(c: torch.Tensor, target: torch.Tensor, approx: torch.Tensor) -> float:
    e = target - approx
    return float((e * (c @ e)).sum())


@torch.no_grad()
def refine_sequential(model: nn.Module, reference: nn.Module, specs: dict[str, dict], windows: torch.Tensor, *,
                      damp: float = 0.01, correct: bool = True, work: str | Path | None = None,
                      batch_size: int = 4, progress: bool = True) -> list[dict]:
    """Re-fit the StructuredLinear modules of ``model`` named in ``specs`` in place, layer by layer, against
    ``reference`` (the same model, rotated, still dense). Returns one record per refitted linear:
    its relative error in the calibration norm before and after, and whether the refit was kept."""
    adapter, ref_adapter = get_adapter(model), get_adapter(reference)
    work = Path(work) if work is not None else None
    xs_c = capture_layer_inputs(model, windows, batch_size)
    xs_d = [x for x, _ in capture_layer_inputs(reference, windows, batch_size)]
    records: list[dict] = []
    layers = adapter.layers()
    bar = tqdm(total=len(layers), desc="refine layers", unit="layer", disable=not progress)
    for i, (layer_c, layer_d) in enumerate(zip(layers, ref_adapter.layers())):
        prefix = adapter.layer_path(i) + "."
        names = [n for n, m in layer_c.named_modules() if isinstance(m, StructuredLinear) and prefix + n in specs]
        saved = work / f"refine{i:03d}.safetensors" if work is not None else None
        if names and saved is not None and saved.exists():
            _load_layer(layer_c, names, specs, prefix, saved)
        elif names:
            factors = {}
            for group in _groups(layer_c, names, xs_c[0][0], xs_c[0][1]):
                c, d, n = None, None, 0
                for (x_c, kw), x_d in zip(xs_c, xs_d):
                    a = _input_of(layer_c, group[0], x_c, kw)
                    b = _input_of(layer_d, group[0], x_d, kw)
                    c = a.T @ a if c is None else c.addmm_(a.T, a)
                    d = a.T @ b if d is None else d.addmm_(a.T, b)
                    n += a.shape[0]
                c, d = c / n, d / n
                lam = damp * float(torch.diagonal(c).mean())
                c = c + lam * torch.eye(c.shape[0], dtype=c.dtype)
                for name in group:
                    w = layer_d.get_submodule(name).weight.detach().to(torch.float64).T
                    target = torch.linalg.solve(c, d @ w + lam * w) if correct else w
                    module = layer_c.get_submodule(name)
                    spec = specs[prefix + name]
                    dtype = next(module.matrix.parameters()).dtype
                    old = module.matrix.materialize().detach().to(torch.float64)
                    fac = project_weighted(target, c, spec)
                    new = structured_from_spec(spec, fac, dtype=torch.float64).materialize().detach()
                    before, after = _fit_loss(c, target, old), _fit_loss(c, target, new)
                    norm = max(float((target * (c @ target)).sum()), 1e-300)
                    keep = after < before
                    if keep:
                        module.matrix = structured_from_spec(spec, {k: v.to(dtype) for k, v in fac.items()},
                                                             dtype=dtype)
                    factors[name] = {k: v.detach().contiguous()
                                     for k, v in module.matrix.factors().items()}
                    records.append({"path": prefix + name, "rel_before": (before / norm) ** 0.5,
                                    "rel_after": (min(before, after) / norm) ** 0.5, "kept": keep})
            if saved is not None:
                _save_layer(saved, factors)
        xs_d = [_layer_output(layer_d(x, **kw)) for x, (_, kw) in zip(xs_d, xs_c)]
        xs_c = [(_layer_output(layer_c(x, **kw)), kw) for x, kw in xs_c]
        bar.update(1)
    bar.close()
    if records:
        mean_b = sum(r["rel_before"] for r in records) / len(records)
        mean_a = sum(r["rel_after"] for r in records) / len(records)
        log.info("refine: %d linears, mean relative error %.4f -> %.4f", len(records), mean_b, mean_a)
    return records


def _save_layer(path: Path, factors: dict[str, dict[str, torch.Tensor]]) -> None:
    tensors = {f"{name}::{k}": t for name, fac in factors.items() for k, t in fac.items()}
    save_tensors_atomic(tensors, path)


def _load_layer(layer: nn.Module, names: list[str], specs: dict[str, dict], prefix: str, path: Path) -> None:
    tensors = load_file(str(path))
    for name in names:
        fac = {k.split("::", 1)[1]: t for k, t in tensors.items() if k.split("::", 1)[0] == name}
        module = layer.get_submodule(name)
        dtype = next(module.matrix.parameters()).dtype
        module.matrix = structured_from_spec(specs[prefix + name], {k: v.to(dtype) for k, v in fac.items()}, dtype=dtype)
