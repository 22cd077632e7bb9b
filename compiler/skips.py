"""Skip (shortcut) matrices on the residual path, and their compact Cayley storage.

With one rotation Q_p per residual position, the residual connection into position p must apply
S_p = Q_{p-1}^T Q_p. Each decoder layer gets two `Shortcut` modules (`attn_shortcut`: position 2l ->
2l+1, `mlp_shortcut`: 2l+1 -> 2l+2); its class is swapped for a subclass whose forward (from the
adapter) multiplies the residual by them. Module paths of everything else stay the HF ones.

Square orthogonal skips are stored as a Cayley pair (strict upper triangle of a skew K and d signs:
d(d+1)/2 numbers) and rebuilt as exact orthogonal matrices; rectangular (sliced) skips stay dense.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import nn

from .adapters import get_adapter, surgery_state

__all__ = ["Shortcut", "install_shortcuts", "add_layer_shortcuts", "shortcut_paths", "cayley_encode", "cayley_decode", "is_orthogonal",
           "shortcut_stored_numel", "stored_parameter_count"]

_CLASS_CACHE: dict[tuple[type, object], type] = {}


class Shortcut(nn.Module):
    """The residual-path matrix: y = x @ weight, weight d_in x d_out (identity when installed)."""

    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(d_in, d_out, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"


def _shortcut_class(base: type, forward) -> type:
    """A cached subclass of a decoder-layer class whose forward applies the shortcuts."""
    key = (base, forward)
    if key not in _CLASS_CACHE:
        name = f"{base.__name__}WithShortcuts"
        cls = type(name, (base,), {"forward": forward, "__module__": __name__})
        globals()[name] = cls                                 # importable by name, so torch.save/pickle work
        _CLASS_CACHE[key] = cls
    return _CLASS_CACHE[key]


def install_shortcuts(model: nn.Module, dims: list[int] | None = None) -> None:
    """Give every decoder layer identity (or given-shape) shortcuts; dims[p] = stream width at position p."""
    adapter = get_adapter(model)
    state = surgery_state(model)
    if state.get("shortcuts"):
        return
    n = adapter.num_layers
    dims = dims or [adapter.hidden_size] * (2 * n + 1)
    dtype = next(model.parameters()).dtype
    forward = adapter.shortcut_forward()
    for i, layer in enumerate(adapter.layers()):
        add_layer_shortcuts(layer, dims[2 * i: 2 * i + 3], dtype, forward)
    state["shortcuts"] = True


def add_layer_shortcuts(layer: nn.Module, dims: list[int], dtype: torch.dtype, forward) -> None:
    """One decoder layer's share of `install_shortcuts`: identity skips of widths ``dims`` (its three
    positions) and the layer class whose ``forward`` (the adapter's) applies them. A streamed compression
    adds them to each layer as it loads it."""
    layer.attn_shortcut = Shortcut(dims[0], dims[1], dtype)
    layer.mlp_shortcut = Shortcut(dims[1], dims[2], dtype)
    layer.__class__ = _shortcut_class(type(layer), forward)


def shortcut_paths(model: nn.Module) -> list[str]:
    """Paths of the skip into each position 1..2L (index p-1), empty without shortcuts."""
    adapter = get_adapter(model)
    if not surgery_state(model).get("shortcuts"):
        return []
    out = []
    for i in range(adapter.num_layers):
        out += [f"{adapter.layer_path(i)}.attn_shortcut", f"{adapter.layer_path(i)}.mlp_shortcut"]
    return out


def _choose_signs(q: torch.Tensor, panel: int = 64) -> torch.Tensor:
    """Signs s (a diagonal D) making I + Q D safely invertible: Gaussian elimination of I + Q D = (Q + D) D where
    each column's sign is picked when it becomes the pivot column, so that every pivot is 1 + |b| >= 1.

    Blocked: the elimination runs column by column inside a panel of ``panel`` columns, and the rest of the
    matrix is updated once per panel with a triangular solve and one matrix product (the column-by-column
    rank-1 updates took 14 s at d = 2048, the blocked form 1 s; the same signs)."""
    a = q.numpy().copy()                                  # Q + D, eliminated in place (multipliers below the diagonal)
    d = a.shape[0]
    signs = np.ones(d)
    for j0 in range(0, d, panel):
        j1 = min(j0 + panel, d)
        for j in range(j0, j1):
            b = float(a[j, j])
            s = 1.0 if b >= 0 else -1.0
            signs[j] = s
            a[j + 1:, j] *= s / (1.0 + abs(b))           # pivot s (|b| + 1): multipliers of column j
            a[j + 1:, j + 1:j1] -= np.outer(a[j + 1:, j], a[j, j + 1:j1])
        if j1 < d:
            a[j0:j1, j1:] = scipy.linalg.solve_triangular(a[j0:j1, j0:j1], a[j0:j1, j1:], lower=True,
                                                          unit_diagonal=True)
            a[j1:, j1:] -= a[j1:, j0:j1] @ a[j0:j1, j1:]
    return torch.from_numpy(signs)


def cayley_encode(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal d x d Q -> (strict upper triangle of skew K, signs): Q D = (I + K)^{-1} (I - K)."""
    q64 = q.detach().double()
    d = q64.shape[0]
    signs = _choose_signs(q64)
    a = q64 * signs                                              # Q D: columns flipped
    eye = torch.eye(d, dtype=torch.float64)
    k = torch.linalg.solve((eye + a).T, (eye - a).T).T           # K = (I - A)(I + A)^{-1}
    k = 0.5 * (k - k.T)                                          # exactly skew
    iu = torch.triu_indices(d, d, 1)
    return k[iu[0], iu[1]], signs


def cayley_decode(upper: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Inverse of `cayley_encode` (float64): an exactly orthogonal Q up to rounding."""
    d = signs.shape[0]
    u = upper.double()
    plus = torch.zeros(d, d, dtype=torch.float64)  # I + K, row by row: no d^2 index tensors or temporaries
    start = 0
    for i in range(d - 1):
        row = u[start:start + d - 1 - i]
        plus[i, i + 1:] = row
        plus[i + 1:, i] = torch.rsub(row, 0.0)
        start += d - 1 - i
    minus = torch.rsub(plus, 0.0)                  # I - K
    plus.diagonal().fill_(1.0)
    minus.diagonal().fill_(1.0)
    out = torch.linalg.solve(plus, minus)
    del plus, minus
    return out.mul_(signs.double())


def is_orthogonal(w: torch.Tensor, atol: float = 1e-4) -> bool:
    """True for a square matrix with W^T W = I (such skips are stored in Cayley form)."""
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        return False
    w64 = w.detach().double()
    return bool((w64.T @ w64 - torch.eye(w.shape[0], dtype=torch.float64)).abs().max() <= atol)


def shortcut_stored_numel(shape: tuple[int, int] | torch.Size, storage: str = "cayley") -> int:
    """Numbers stored for one skip: d(d+1)/2 for a square orthogonal skip in Cayley form, else d_in*d_out."""
    d_in, d_out = int(shape[0]), int(shape[1])
    if storage == "cayley" and d_in == d_out:
        return d_in * (d_in + 1) // 2
    return d_in * d_out


def stored_parameter_count(model: nn.Module, skip_storage: str = "cayley") -> int:
    """Parameters a saved/exported file holds: every distinct parameter once (tied ones once), with
    shortcuts counted as stored: `skip_storage` "cayley" (orthogonal skips as d(d+1)/2, the checkpoint's
    choice; sliced/non-orthogonal ones dense) or "dense" (every skip d_in x d_out)."""
    skips = {id(m.weight): (m.weight.shape, "cayley" if skip_storage == "cayley" and is_orthogonal(m.weight)
                            else "dense") for m in model.modules() if isinstance(m, Shortcut)}
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += shortcut_stored_numel(*skips[id(p)]) if id(p) in skips else p.numel()
    return total
