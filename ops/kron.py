"""Sums of Kronecker products W = sum_s a_s (x) b_s, multiplied by two GEMMs, never materialized."""

from __future__ import annotations

import torch
from torch import nn

from procrustes_onnx.core.errors import UserError

from .base import StructuredMatrix

__all__ = ["KroneckerSum", "kron_materialize", "kron_apply", "kron_factor_layouts", "kron_macs", "kron_order"]


def kron_macs(r: int, m1: int, n1: int, m2: int, n2: int) -> dict[str, int]:
    """Per-token MACs of the two contraction orders.

    "a_first" contracts x's m1 axis with a, then (s, m2) with b: r*n1*m2*(m1 + n2).
    "b_first" contracts x's m2 axis with b, then (s, m1) with a: r*m1*n2*(m2 + n1).
    For the paper's shapes one of them is ~ r/q of dense and the other ~ r x dense.
    """
    return {"a_first": r * n1 * m2 * (m1 + n2), "b_first": r * m1 * n2 * (m2 + n1)}


def kron_order(r: int, m1: int, n1: int, m2: int, n2: int) -> str:
    """The cheaper contraction order (ties go to a_first)."""
    c = kron_macs(r, m1, n1, m2, n2)
    return "a_first" if c["a_first"] <= c["b_first"] else "b_first"


def kron_materialize(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dense sum_s kron(a_s, b_s) for a [..., r, m1, n1], b [..., r, m2, n2] -> [..., m1*m2, n1*n2]."""
    *lead, r, m1, n1 = a.shape
    m2, n2 = b.shape[-2:]
    w = torch.einsum("...sij,...skl->...ikjl", a, b)
    return w.reshape(*lead, m1 * m2, n1 * n2)


def kron_factor_layouts(a: torch.Tensor, b: torch.Tensor, order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 2-D GEMM operands of `order` (copies; the ONNX lowering uses the same layouts).

    a_first: A [m1, (j1, s)] and B [(i2, s), n2];  b_first: B [m2, (j2, s)] and A [(i1, s), n1].
    """
    if order == "a_first":
        return kron_operand(a, True), kron_operand(b, False)
    if order == "b_first":
        return kron_operand(b, True), kron_operand(a, False)
    raise UserError(f"unknown Kronecker contraction order {order!r}; use 'a_first' or 'b_first'")


def kron_operand(x: torch.Tensor, first: bool) -> torch.Tensor:
    """One factor's 2-D GEMM operand (a copy): [i, (j, s)] for the first GEMM, [(i, s), j] for the second."""
    r, m, n = x.shape
    return x.permute(1, 2, 0).reshape(m, n * r) if first else x.permute(1, 0, 2).reshape(m * r, n)


def kron_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, order: str | None = None,
               layouts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [..., m1*m2] @ sum_s kron(a_s, b_s) with two 2-D GEMMs (the same plan as the ONNX lowering)."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    lead = x.shape[:-1]
    order = order or kron_order(r, m1, n1, m2, n2)
    first, second = layouts if layouts is not None else kron_factor_layouts(a, b, order)
    if order == "a_first":
        xt = x.reshape(-1, m1, m2).transpose(1, 2)                      # [N, m2, m1]
        t = xt @ first                                                  # [N, m2, (j1, s)]
        t = t.reshape(-1, m2, n1, r).transpose(1, 2).reshape(-1, n1, m2 * r)
        y = t @ second                                                  # [N, n1, n2]
    else:
        t = x.reshape(-1, m1, m2) @ first                               # [N, m1, (j2, s)]
        t = t.reshape(-1, m1, n2, r).transpose(1, 2).reshape(-1, n2, m1 * r)
        y = (t @ second).transpose(1, 2)                                # [N, n1, n2]
    return y.reshape(*lead, n1 * n2)


class KroneckerSum(StructuredMatrix):
    """W = sum_{s<r} kron(a[s], b[s]); a [r, m1, n1], b [r, m2, n2]; W is (m1*m2) x (n1*n2).

    Paper shapes: input side rotated (q/k/v/gate/up, W d x n): a [r, q, 1], b [r, d/q, n];
    output side rotated (o/down, W n x d): a [r, 1, q], b [r, n, d/q].
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0]:
            raise UserError(f"KroneckerSum needs a [r, m1, n1] and b [r, m2, n2] with the same r, "
                            f"got {tuple(a.shape)} and {tuple(b.shape)}")
        if a.dtype != b.dtype:
            raise UserError(f"KroneckerSum factors must share a dtype, got {a.dtype} and {b.dtype}")
        self.a = nn.Parameter(a.detach().clone(), requires_grad=a.requires_grad)
        self.b = nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
        self.rank, self.m1, self.n1 = (int(s) for s in a.shape)
        self.m2, self.n2 = int(b.shape[1]), int(b.shape[2])
        self.in_features = self.m1 * self.m2
        self.out_features = self.n1 * self.n2
        self._cache: tuple | None = None   # (key, layouts): inference-time GEMM operands, not state

    @property
    def order(self) -> str:
        return kron_order(self.rank, self.m1, self.n1, self.m2, self.n2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_apply(x, self.a, self.b, self.order, self._layouts())

    def _layouts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached GEMM layouts when no gradient flows (rebuilt when a factor changes in place)."""
        if torch.is_grad_enabled() and (self.a.requires_grad or self.b.requires_grad):
            return None
        key = (self.a._version, self.b._version, self.a.data_ptr(), self.b.data_ptr(), self.a.dtype, self.a.device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, kron_factor_layouts(self.a, self.b, self.order))
        return self._cache[1]

    def materialize(self) -> torch.Tensor:
        return kron_materialize(self.a, self.b)

    def macs(self, tokens: int = 1) -> int:
        return tokens * min(kron_macs(self.rank, self.m1, self.n1, self.m2, self.n2).values())

    def spec(self) -> dict:
        return {"kind": "kron", "rank": self.rank, "a_shape": [self.m1, self.n1],
                "b_shape": [self.m2, self.n2], "in": self.in_features, "out": self.out_features}

    def factors(self) -> dict[str, torch.Tensor]:
        return {"a": self.a, "b": self.b}
