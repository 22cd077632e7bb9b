"""Common interface of every structured matrix W (in x out, y = x @ W) so callers never branch on kind."""

from __future__ import annotations

import abc

import torch
from torch import nn

__all__ = ["StructuredMatrix"]


class StructuredMatrix(nn.Module, abc.ABC):
    """A matrix W of shape (in_features, out_features) that multiplies without being materialized.

    Subclasses store their factors as parameters named after `factors()` keys, so a state dict
    round-trips through `structured_from_spec(spec(), factors())`.
    """

    in_features: int
    out_features: int

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x @ W [..., out], without forming W."""

    @abc.abstractmethod
    def materialize(self) -> torch.Tensor:
        """The dense W (in x out), for tests, export of the dense baseline, and error measurement."""

    @abc.abstractmethod
    def macs(self, tokens: int = 1) -> int:
        """Multiply-accumulates of forward() for `tokens` rows (the contraction order forward uses)."""

    @abc.abstractmethod
    def spec(self) -> dict:
        """JSON-able description: {"kind": ..., shapes...}; enough to rebuild with the factors."""

    @abc.abstractmethod
    def factors(self) -> dict[str, torch.Tensor]:
        """Name -> tensor of everything needed to rebuild the matrix (the parameters)."""

    @property
    def num_params(self) -> int:
        """Stored numbers (the factors' elements)."""
        return sum(int(t.numel()) for t in self.factors().values())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)

    def dense_macs(self, tokens: int = 1) -> int:
        """MACs of the equivalent dense x @ W, for speed-up ideals."""
        return tokens * self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"{self.spec()}"
