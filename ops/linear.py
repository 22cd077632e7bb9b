"""nn.Linear drop-in whose weight is a structured matrix: y = matrix(x) + bias."""

from __future__ import annotations

import torch
from torch import nn

from procrustes_onnx.core.errors import UserError

from .base import StructuredMatrix

__all__ = ["StructuredLinear", "stand_in_linear"]


class StructuredLinear(nn.Module):
    """Replaces nn.Linear(in, out): same in_features/out_features/bias, no dense `.weight`."""

    def __init__(self, matrix: StructuredMatrix, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.matrix = matrix
        self.in_features = matrix.in_features
        self.out_features = matrix.out_features
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise UserError(f"StructuredLinear bias must have shape ({self.out_features},), "
                                f"got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matrix(x)
        return y if self.bias is None else y + self.bias

    def to_linear(self) -> nn.Linear:
        """An equivalent nn.Linear (weight = W^T), e.g. for the dense ONNX baseline."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                        dtype=next(iter(self.matrix.factors().values())).dtype)
        lin.weight = nn.Parameter(self.matrix.materialize().detach().T.contiguous())
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone())
        return lin

    @property
    def num_params(self) -> int:
        return self.matrix.num_params + (0 if self.bias is None else self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def stand_in_linear(in_features: int, out_features: int, fill: float, dtype: torch.dtype,
                    bias: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear whose weight is the constant ``fill`` broadcast to out x in (stride 0: no memory), with
    ``bias``: what an export traces for a structured linear whose MatMul the rewrite replaces by its factors."""
    lin = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=dtype)
    lin.weight = nn.Parameter(torch.full((), fill, dtype=dtype).expand(out_features, in_features), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone())
    return lin
