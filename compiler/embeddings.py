"""`--compress-embeddings`: replace the (rotated) token embedding by low-rank factors, and a tied head by a
head reading the same factors.

Done after the rotations: a low-rank fit of E Q is the fit of E rotated (the row-weighted SVD does not
see a right rotation), so the rotation solve is unaffected. Rows are weighted by token frequency in the
calibration windows (`procrustes.token_weights`: sqrt(count + 1) by default) and, for a tied table, its
columns by the Gram of the head's input, which cut the PPL cost about threefold in a SmolLM2 probe
(docs/compression_quality.md).
"""

from __future__ import annotations

import torch
from torch import nn

from procrustes_onnx.ops import projection_error
from procrustes_onnx.ops.embedding import FactoredEmbedding, FactoredHead, project_embedding

from .adapters import get_module, set_module
from .calibration import collect_grams, damp_gram, token_counts
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
def factor_embedding(model: nn.Module, entry: dict, windows: torch.Tensor, weighting: str = "sqrt",
                     damp: float = 0.01) -> float:
    """Fit and install the planned factors; returns the relative error of the table in the fitted norm.

    Rows are weighted by token frequency; a tied table is also weighted on its columns by the Gram of the
    head's input, collected from ``model`` as it is (already compressed), so the head's own input is used."""
    table = get_module(model, entry["path"]).weight.detach()
    w = token_weights(token_counts(windows, table.shape[0]), weighting)
    gram = None
    if entry["tied"]:
        gram = damp_gram(collect_grams(model, windows, [entry["head"]], progress=False)[entry["head"]], damp)
    a, b = project_embedding(table, int(entry["rank"]), w, gram)
    install_factored_embedding(model, entry, a, b)
    full = w[:, None] * table.to(torch.float64)
    approx = w[:, None] * (a.to(torch.float64) @ b.to(torch.float64))
    return projection_error(full.T, approx.T, gram)          # the Gram acts on the d side: transpose
