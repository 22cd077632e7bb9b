"""`--compress-embeddings`: replace the (rotated) token embedding by low-rank factors, and a tied head by a
head reading the same factors.

Done after the rotations: a low-rank fit of E Q is the fit of E rotated (the row-weighted SVD does not
see a right rotation), so the rotation solve is unaffected. Rows are weighted by token frequency in the
calibration windows (`procrustes.token_weights`: sqrt(count + 1) by default).
"""

from __future__ import annotations

import torch
from torch import nn

from procrustes_onnx.ops.embedding import FactoredEmbedding, FactoredHead, project_embedding

from .adapters import get_module, set_module
from .calibration import token_counts
from .procrustes import token_weights

__all__ = ["factor_embedding", "install_factored_embedding"]


def install_factored_embedding(model: nn.Module, entry: dict, a: torch.Tensor, b: torch.Tensor) -> FactoredEmbedding:
    """Put FactoredEmbedding(a, b) at entry["path"] (and a FactoredHead on it when entry["tied"])."""
    old = get_module(model, entry["path"])
    emb = FactoredEmbedding(a, b, padding_idx=getattr(old, "padding_idx", None))
    set_module(model, entry["path"], emb)
    if entry["tied"]:
        set_module(model, entry["head"], FactoredHead(emb))
    return emb


@torch.no_grad()
def factor_embedding(model: nn.Module, entry: dict, windows: torch.Tensor, weighting: str = "sqrt") -> float:
    """Fit and install the planned factors; returns the weighted relative error of the table."""
    table = get_module(model, entry["path"]).weight.detach()
    w = token_weights(token_counts(windows, table.shape[0]), weighting)
    a, b = project_embedding(table, int(entry["rank"]), w)
    install_factored_embedding(model, entry, a, b)
    e64 = table.to(torch.float64)
    diff = w[:, None] * (e64 - a.to(torch.float64) @ b.to(torch.float64))
    return float(diff.norm() / (w[:, None] * e64).norm())
