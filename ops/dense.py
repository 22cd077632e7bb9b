"""Pass-through for matrices kept full (v_proj by default), so every linear has the same interface."""

from __future__ import annotations

import torch
from torch import nn

from procrustes_onnx.core.errors import UserError

from .base import StructuredMatrix

__all__ = ["DenseMatrix"]


class DenseMatrix(StructuredMatrix):
    """W stored as is: weight [in, out]."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise UserError(f"DenseMatrix needs a 2-D weight [in, out], got shape {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.in_features, self.out_features = (int(s) for s in weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight

    def materialize(self) -> torch.Tensor:
        return self.weight

    def macs(self, tokens: int = 1) -> int:
        return tokens * self.in_features * self.out_features

    def spec(self) -> dict:
        return {"kind": "dense", "in": self.in_features, "out": self.out_features}

    def factors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}
