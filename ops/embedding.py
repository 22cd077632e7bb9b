"""Low-rank token embedding E = A B (A [V, r], B [r, d]) and the tied LM head that reads the same factors.

The lookup is Gather(A) then a [r, d] MatMul; the head is two MatMuls, (h B^T) A^T, so the file stores
r (V + d) numbers instead of V d and no V x d matrix is ever formed. Rows are fitted in a norm weighted
per token (`project_embedding`): the lookup of a token that never occurs costs nothing, while the head
still scores every token, so the weights are softened (sqrt of counts, as the paper's token weighting).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from procrustes_onnx.core.errors import UserError

__all__ = ["FactoredEmbedding", "FactoredHead", "project_embedding", "embedding_rank"]


class FactoredEmbedding(nn.Module):
    """nn.Embedding drop-in whose table is the product of `a` [V, r] and `b` [r, d]."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise UserError(f"factored embedding needs a [V, r] and b [r, d], got {tuple(a.shape)} and "
                            f"{tuple(b.shape)}")
        self.a = nn.Parameter(a.detach().clone(), requires_grad=False)
        self.b = nn.Parameter(b.detach().clone(), requires_grad=False)
        self.num_embeddings, self.rank = a.shape
        self.embedding_dim = b.shape[1]
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.a) @ self.b

    def materialize(self) -> torch.Tensor:
        """The dense V x d table (for references and tests only)."""
        return self.a @ self.b

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


class FactoredHead(nn.Module):
    """Tied LM head on a FactoredEmbedding: logits = (h B^T) A^T, sharing the embedding's parameters."""

    def __init__(self, embedding: FactoredEmbedding) -> None:
        super().__init__()
        self.embedding = embedding          # the same module: its parameters are stored once
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h @ self.embedding.b.T) @ self.embedding.a.T


def embedding_rank(vocab: int, dim: int, kept: float) -> int:
    """Largest rank whose factors keep at most `kept` of the V x d table's numbers (at least 1)."""
    if not 0 < kept < 1:
        raise UserError(f"embedding kept share {kept} must be in (0, 1): at 1 the factors store more than the "
                        f"table; drop --compress-embeddings to keep it dense")
    return max(1, min(dim, int(kept * vocab * dim / (vocab + dim))))


def project_embedding(table: torch.Tensor, rank: int, row_weights: torch.Tensor | None = None,
                      col_gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (a, b) minimizing ||D (E - a b) C^(1/2)||_F, D = diag(row_weights), C = col_gram (the Gram of
    the tied head's input: directions the head never reads cost nothing). Either weighting may be omitted.

    Closed form: the rank-r truncated SVD of D E C^(1/2), with D and C^(1/2) undone on the factors.
    """
    if table.dim() != 2 or not 1 <= rank <= min(table.shape):
        raise UserError(f"embedding rank {rank} is outside 1..{min(table.shape)} for a table of shape "
                        f"{tuple(table.shape)}")
    e = table.detach().to(torch.float64)
    w = torch.ones(e.shape[0], dtype=torch.float64, device=e.device) if row_weights is None else row_weights.to(e.device, torch.float64)
    if w.shape != (e.shape[0],) or not bool((w > 0).all()):
        raise UserError(f"embedding row weights must be {e.shape[0]} positive numbers, got shape {tuple(w.shape)}")
    x = w[:, None] * e
    if col_gram is not None:
        root, inv_root = _sqrt_and_inverse_sqrt(col_gram, e.shape[1])
        x = x @ root
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    a, b = u[:, :rank] * (s[:rank] / w[:, None]), vh[:rank]
    if col_gram is not None:
        b = b @ inv_root
    return a.to(table.dtype), b.to(table.dtype)


def _sqrt_and_inverse_sqrt(gram: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = gram.to(torch.float64)
    if tuple(c.shape) != (dim, dim):
        raise UserError(f"embedding column Gram must be {dim}x{dim}, got {tuple(c.shape)}")
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    if not bool(evals.min() > 1e-12 * evals.max().clamp(min=1e-300)):
        raise UserError("embedding column Gram is not positive definite: damp it (calibration.damp_gram)")
    return (evecs * evals.sqrt()) @ evecs.T, (evecs / evals.sqrt()) @ evecs.T
