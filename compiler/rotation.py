"""Rotations of the residual stream of a fused model: one global Q, or one Q per residual position.

Position p's rotation Q_p (d_p x d'_p with orthonormal columns; square = exact, narrower = SliceGPT
slicing) multiplies its readers' inputs (W_in -> Q_p^T W_in), its writers' outputs (W_out -> W_out Q_p),
and the skips on either side (S_p -> S_p Q_p, S_{p+1} -> Q_p^T S_{p+1}). Rotations of different
positions commute, so positions can be rotated in any order, one at a time (SliceGPT does).
The arithmetic runs in float64 and is cast back to each parameter's dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from procrustes_onnx.core.errors import UserError

from .adapters import get_adapter, get_module, surgery_state
from .fusion import require_fused
from .positions import num_positions, position_dims, residual_positions
from .skips import install_shortcuts, shortcut_paths

__all__ = ["rotate_position", "rotate_global", "rotate_per_position", "random_orthogonal"]


def random_orthogonal(d: int, *, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random d x d orthogonal matrix from a seeded generator (for tests and the paper's `test` init)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


def _rotated(w: torch.Tensor, q: torch.Tensor, *, left: bool = False, block: int = 4096) -> torch.Tensor:
    """w @ q (``left``: q^T @ w) in float64, returned in w's dtype, ``block`` rows (columns) of w at a time: a
    vocabulary table is never held in float64 whole (at 32,000 x 2048 that and its product were 1 GiB, the peak
    of a streamed hidden-2048 run)."""
    w = w.detach()
    if left:
        out = torch.empty(q.shape[1], w.shape[1], dtype=w.dtype, device=w.device)
        for j in range(0, w.shape[1], block):
            out[:, j:j + block] = q.T @ w[:, j:j + block].double()
    else:
        out = torch.empty(w.shape[0], q.shape[1], dtype=w.dtype, device=w.device)
        for i in range(0, w.shape[0], block):
            out[i:i + block] = w[i:i + block].double() @ q
    return out


def _rotate_input(module: nn.Module, q: torch.Tensor) -> None:
    """A Linear reading the stream: W_in -> Q^T W_in, i.e. weight (out x d) -> weight Q."""
    if not isinstance(module, nn.Linear):
        raise UserError(f"cannot rotate a {type(module).__name__}; rotate the dense model before compressing it")
    _set(module.weight, _rotated(module.weight, q))
    module.in_features = q.shape[1]


def _rotate_output(module: nn.Module, q: torch.Tensor) -> None:
    """A module writing the stream: W_out -> W_out Q (Linear weight d x in -> Q^T weight; bias -> bias Q)."""
    if isinstance(module, nn.Embedding):
        _set(module.weight, _rotated(module.weight, q))
        module.embedding_dim = q.shape[1]
        return
    if not isinstance(module, nn.Linear):
        raise UserError(f"cannot rotate a {type(module).__name__}; rotate the dense model before compressing it")
    _set(module.weight, _rotated(module.weight, q, left=True))
    if module.bias is not None:
        _set(module.bias, module.bias.detach().double() @ q)
    module.out_features = q.shape[1]


def rotate_position(model: nn.Module, p: int, q: torch.Tensor) -> None:
    """Rotate residual position p by q (d_p x d'_p, orthonormal columns) in place."""
    require_fused(model)
    adapter, state = get_adapter(model), surgery_state(model)
    positions = residual_positions(model)
    d_p = position_dims(model)[p]
    q = q.detach().double()
    if q.ndim != 2 or q.shape[0] != d_p or q.shape[1] > d_p:
        raise UserError(f"rotation for position {p} has shape {tuple(q.shape)}; expected {d_p} x k with k <= {d_p}")
    if (q.T @ q - torch.eye(q.shape[1], dtype=q.dtype)).abs().max() > 1e-4:
        raise UserError(f"rotation for position {p} is not orthogonal (Q^T Q != I); orthonormalize it first")
    with torch.no_grad():
        for ref in positions[p].readers:
            _rotate_input(get_module(model, ref.path), q)
        for ref in positions[p].writers:
            _rotate_output(get_module(model, ref.path), q)
        if p == 0 and state.get("tied_head"):      # the pre-head matrix writes in the tied table's basis
            _rotate_output(get_module(model, f"{adapter.final_norm_path}.proj"), q)
        if p == 0 and state.get("centring"):
            centring = get_module(model, adapter.embed_hook_path)
            _set(centring.direction, centring.direction.detach().double() @ q)
        skips = shortcut_paths(model)
        if skips:
            if p > 0:
                s = get_module(model, skips[p - 1]).weight
                _set(s, s.detach().double() @ q)
            if p < len(skips):
                s = get_module(model, skips[p]).weight
                _set(s, q.T @ s.detach().double())


def rotate_global(model: nn.Module, q: torch.Tensor) -> None:
    """One Q for the whole stream: no skip matrices needed, the result keeps the original architecture
    (plus the tied head's d x d pre-matrix). Existing skips, if any, become Q^T S Q."""
    for p in range(num_positions(model)):
        rotate_position(model, p, q)
    state = surgery_state(model)
    if state["rotation"] == "none":
        state["rotation"] = "global"


def rotate_per_position(model: nn.Module, qs: Sequence[torch.Tensor]) -> None:
    """One Q_p per position (the paper): installs skips S_p = Q_{p-1}^T Q_p on the residual path."""
    n = num_positions(model)
    if len(qs) != n:
        raise UserError(f"got {len(qs)} rotations for a model with {n} residual positions (2L+1); pass one per position")
    require_fused(model)
    install_shortcuts(model, position_dims(model))
    for p, q in enumerate(qs):
        rotate_position(model, p, q)
    surgery_state(model)["rotation"] = "per-position"
