"""SliceGPT baseline (method.md §5): per-position PCA rotations from calibration activations, then slicing.

Positions are processed in order on the already rotated and sliced prefix (as SliceGPT does): the
stream entering layer 0 is captured once, then each layer is run on its cached input twice (once to
measure the pre-MLP stream, once, after that position is rotated, for its output). Gram matrices are
float64 and damped by `damp * mean(diag)`; Q_p holds the eigenvectors by decreasing eigenvalue and
keeps the first d' columns. Every position keeps the same d', chosen so that the fraction of
parameters removed (counted as `stored_parameter_count` counts: sliced skips are dense d' x d',
the tied head's pre-matrix d' x d') reaches the requested ratio.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from procrustes_onnx.core.errors import UserError

from .adapters import get_adapter, get_module, surgery_state
from .calibration import calibration_windows_for, capture_layer_inputs
from .checkpoint import save_compressed
from .fusion import fuse_norms
from .positions import residual_positions
from .rotation import rotate_position
from .skips import Shortcut, install_shortcuts, shortcut_paths, stored_parameter_count

__all__ = ["pca_basis", "sliced_parameter_count", "slicegpt_dim", "slice_model", "slicegpt_compress"]

log = logging.getLogger(__name__)


def pca_basis(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Eigenvectors of the damped Gram, by decreasing eigenvalue (float64, d x d)."""
    h = gram.double()
    h = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(h)
    return evecs[:, torch.argsort(evals, descending=True)]


def _stream_exponents(model: nn.Module) -> dict[int, tuple[torch.Tensor, int]]:
    """param id -> (param, number of its dims that are the residual width) for a fused model with skips."""
    adapter, state = get_adapter(model), surgery_state(model)
    out: dict[int, tuple[torch.Tensor, int]] = {id(p): (p, 0) for p in model.parameters()}
    for pos in residual_positions(model):
        for ref in pos.readers:
            out[id(get_module(model, ref.path).weight)] = (get_module(model, ref.path).weight, 1)
        for ref in pos.writers:
            module = get_module(model, ref.path)
            for p in module.parameters(recurse=False):
                out[id(p)] = (p, 1)
    if state.get("tied_head"):
        proj = get_module(model, f"{adapter.final_norm_path}.proj")
        out[id(proj.weight)] = (proj.weight, 2)
        if proj.bias is not None:
            out[id(proj.bias)] = (proj.bias, 1)
    if state.get("centring"):
        direction = get_module(model, adapter.embed_hook_path).direction
        out[id(direction)] = (direction, 1)
    for path in shortcut_paths(model):
        w = get_module(model, path).weight
        out[id(w)] = (w, 2)
    return out


def sliced_parameter_count(model: nn.Module, dim: int) -> int:
    """Stored parameters of `model` (fused, full width, identity skips) if every position were sliced
    to `dim`: sliced skips are no longer orthogonal and are stored dense."""
    d = get_adapter(model).hidden_size
    skips = {id(m.weight) for m in model.modules() if isinstance(m, Shortcut)}
    total = 0
    for pid, (p, k) in _stream_exponents(model).items():
        if pid in skips and dim == d:
            total += d * (d + 1) // 2                         # unsliced skips stay orthogonal: Cayley
        else:
            total += p.numel() // d ** k * dim ** k
    return total


def slicegpt_dim(model: nn.Module, ratio: float, original_params: int, round_to: int = 1) -> int:
    """The widest d' (a multiple of `round_to`) whose model removes at least `ratio` of `original_params`."""
    d = get_adapter(model).hidden_size
    for dim in range(d - d % round_to, 0, -round_to):
        if 1 - sliced_parameter_count(model, dim) / original_params >= ratio:
            return dim
    raise UserError(f"slicing cannot remove {ratio:.1%} of the parameters; ask for a smaller --ratio")


def _gram(xs: list[torch.Tensor]) -> torch.Tensor:
    """Sum of X^T X over batches, in float64, one batch at a time (bounded memory)."""
    gram = None
    for x in xs:
        flat = x.reshape(-1, x.shape[-1]).double()
        gram = flat.T @ flat if gram is None else gram.addmm_(flat.T, flat)
    return gram


@torch.no_grad()
def slice_model(model: nn.Module, windows: torch.Tensor, *, ratio: float | None = None, dim: int | None = None,
                original_params: int | None = None, damp: float = 0.01, round_to: int = 1, batch_size: int = 4,
                progress: Callable[[str], None] | None = None) -> dict:
    """Fuse, PCA-rotate and slice `model` in place to width `dim` (or the width reaching `ratio`).

    Returns a report: dim, removed fraction (vs `original_params`, default: the model as given), params.
    """
    model.eval()
    original = original_params or stored_parameter_count(model)
    fuse_norms(model)
    install_shortcuts(model)
    adapter = get_adapter(model)
    if dim is None:
        if ratio is None:
            raise UserError("slice_model needs a ratio (fraction of parameters removed) or a width")
        dim = slicegpt_dim(model, ratio, original, round_to)
    if not 0 < dim <= adapter.hidden_size:
        raise UserError(f"slicing width {dim} is outside 1..{adapter.hidden_size}")
    xs = capture_layer_inputs(model, windows, batch_size)
    q = pca_basis(_gram([x for x, _ in xs]), damp)[:, :dim]
    rotate_position(model, 0, q)
    xs = [((x.double() @ q).to(x.dtype), kw) for x, kw in xs]
    for i, layer in enumerate(adapter.layers()):
        mids: list[torch.Tensor] = []
        handle = get_module(model, adapter.mlp_norm_path(i)).register_forward_pre_hook(
            lambda _m, args: mids.append(args[0].detach()))
        try:
            for x, kw in xs:
                layer(x, **kw)
        finally:
            handle.remove()
        rotate_position(model, 2 * i + 1, pca_basis(_gram(mids), damp)[:, :dim])
        del mids
        outs = [layer(x, **kw) for x, kw in xs]
        q = pca_basis(_gram(outs), damp)[:, :dim]
        rotate_position(model, 2 * i + 2, q)
        xs = [((y.double() @ q).to(y.dtype), kw) for y, (_, kw) in zip(outs, xs)]
        if progress:
            progress(f"slicegpt: layer {i + 1}/{adapter.num_layers} sliced to {dim}")
    surgery_state(model)["rotation"] = "slicegpt"
    params = stored_parameter_count(model)
    return {"dim": dim, "hidden_size": adapter.hidden_size, "params": params, "original_params": original,
            "removed": 1 - params / original, "damp": damp, "round_to": round_to}


def slicegpt_compress(model: nn.Module, tokenizer, config, out_dir: str | Path, *, original_params: int,
                      echo: Callable[[str], None] = print, source: str | None = None) -> Path:
    """The `--method slicegpt` path of `compress`: calibrate on config's text, slice to config.ratio, save."""

    if config.ratio is None:
        raise UserError("--method slicegpt needs --ratio (fraction of parameters removed), not a --preset")
    windows = calibration_windows_for(tokenizer, config)
    torch.manual_seed(config.seed)
    report = slice_model(model, windows, ratio=float(config.ratio), original_params=original_params,
                         progress=lambda s: log.info(s))
    echo(f"SliceGPT: width {report['hidden_size']} -> {report['dim']}, {report['params']:,} parameters, "
         f"{report['removed']:.2%} removed")
    return save_compressed(model, out_dir, tokenizer=tokenizer, source=source,
                           extra_config={"compression": config.settings(), "slicegpt": report,
                                         "original_params": original_params, "removed": report["removed"]})
