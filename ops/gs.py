"""Group-and-Shuffle matrices W = blockdiag(L) P blockdiag(R) (Gorbunov et al. 2024), via two bmm's.

The perfect shuffle P is defined here and only here: for z = x @ blockdiag(L) (length kl*bl2, index
l*bl2 + c for block l, channel c), u = z P has u[i] = z[p[i]] with p[i] = (i mod kl)*bl2 + i // kl,
i.e. view z as [kl, bl2], transpose to [bl2, kl], flatten. u is then cut into kr blocks of br1.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from procrustes_onnx.core.errors import UserError

from .base import StructuredMatrix

__all__ = ["GSMatrix", "shuffle_perm", "gs_channels", "gs_materialize", "gs_apply", "check_gs_shapes"]


def check_gs_shapes(kl: int, bl1: int, bl2: int, kr: int, br1: int, br2: int) -> None:
    """Raise UserError unless the shapes define a GS matrix (all positive, kl*bl2 == kr*br1)."""
    if min(kl, bl1, bl2, kr, br1, br2) < 1 or kl * bl2 != kr * br1:
        raise UserError(f"GS shapes (kl={kl}, bl1={bl1}, bl2={bl2} | kr={kr}, br1={br1}, br2={br2}) "
                        f"need positive sizes and kl*bl2 == kr*br1 ({kl * bl2} != {kr * br1})")


def shuffle_perm(kl: int, bl2: int) -> torch.Tensor:
    """p with u[i] = z[p[i]]: p[i] = (i mod kl)*bl2 + i // kl (the one definition of P)."""
    i = torch.arange(kl * bl2)
    return (i % kl) * bl2 + i // kl


@lru_cache(maxsize=256)
def gs_channels(kl: int, bl2: int, kr: int, br1: int) -> dict[str, np.ndarray]:
    """For every inner channel i: source block l and column c of L, target block r and row j of R,
    and its slot t among the channels routed from l to r (so block (l, r) of W has rank <= count)."""
    n = kl * bl2
    i = np.arange(n)
    p = (i % kl) * bl2 + i // kl
    l, c = p // bl2, p % bl2
    r, j = i // br1, i % br1
    pair = l * kr + r
    t = np.zeros(n, dtype=np.int64)
    counts = np.zeros(kl * kr, dtype=np.int64)
    for k in range(n):  # channels in increasing i get consecutive slots within their (l, r) pair
        t[k] = counts[pair[k]]
        counts[pair[k]] += 1
    return {"l": l, "c": c, "r": r, "j": j, "t": t, "counts": counts.reshape(kl, kr)}


@lru_cache(maxsize=256)
def gs_pairs(kl: int, bl2: int, kr: int, br1: int) -> tuple[tuple[int, int, torch.Tensor, torch.Tensor], ...]:
    """(l, r, columns of L_l, rows of R_r) for every block pair the shuffle connects."""
    ch = gs_channels(kl, bl2, kr, br1)
    pairs = []
    for l in range(kl):
        for r in range(kr):
            sel = np.flatnonzero((ch["l"] == l) & (ch["r"] == r))
            if len(sel):
                pairs.append((l, r, torch.as_tensor(ch["c"][sel]), torch.as_tensor(ch["j"][sel])))
    return tuple(pairs)


def gs_materialize(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Dense blockdiag(left) P blockdiag(right), one block at a time: block (l, r) is L_l[:, S_lr] R_r[S_lr, :]
    for the channels S_lr the shuffle routes from l to r (`gs_channels`). The product of the two block diagonals
    would spend kl*kr times the flops on zeros and hold two dense copies of Z."""
    kl, bl1, bl2 = left.shape
    kr, br1, br2 = right.shape
    w = left.new_zeros(kl * bl1, kr * br2, dtype=torch.promote_types(left.dtype, right.dtype))
    for l, r, cols, rows in gs_pairs(kl, bl2, kr, br1):
        w[l * bl1:(l + 1) * bl1, r * br2:(r + 1) * br2] = left[l][:, cols.to(left.device)] @ right[r][rows.to(right.device)]
    return w


def gs_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x [..., kl*bl1] @ W with batched GEMMs over blocks and a transpose for the shuffle."""
    kl, bl1, bl2 = left.shape
    kr, br1, br2 = right.shape
    lead = x.shape[:-1]
    z = torch.bmm(x.reshape(-1, kl, bl1).transpose(0, 1), left)    # [kl, N, bl2]
    u = z.permute(1, 2, 0).reshape(-1, kr, br1).transpose(0, 1)     # shuffle -> [kr, N, br1]
    y = torch.bmm(u, right)                                         # [kr, N, br2]
    return y.transpose(0, 1).reshape(*lead, kr * br2)


class GSMatrix(StructuredMatrix):
    """W = blockdiag(left) P blockdiag(right); left [kl, bl1, bl2], right [kr, br1, br2]; W (kl*bl1) x (kr*br2)."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor) -> None:
        super().__init__()
        if left.dim() != 3 or right.dim() != 3:
            raise UserError(f"GSMatrix needs left [kl, bl1, bl2] and right [kr, br1, br2], "
                            f"got {tuple(left.shape)} and {tuple(right.shape)}")
        check_gs_shapes(*left.shape, *right.shape)
        self.left = nn.Parameter(left.detach().clone(), requires_grad=left.requires_grad)
        self.right = nn.Parameter(right.detach().clone(), requires_grad=right.requires_grad)
        self.kl, self.bl1, self.bl2 = (int(s) for s in left.shape)
        self.kr, self.br1, self.br2 = (int(s) for s in right.shape)
        self.in_features = self.kl * self.bl1
        self.out_features = self.kr * self.br2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gs_apply(x, self.left, self.right)

    def materialize(self) -> torch.Tensor:
        return gs_materialize(self.left, self.right)

    def macs(self, tokens: int = 1) -> int:
        return tokens * (self.kl * self.bl1 * self.bl2 + self.kr * self.br1 * self.br2)

    def spec(self) -> dict:
        return {"kind": "gs", "left": [self.kl, self.bl1, self.bl2], "right": [self.kr, self.br1, self.br2],
                "in": self.in_features, "out": self.out_features}

    def factors(self) -> dict[str, torch.Tensor]:
        return {"left": self.left, "right": self.right}
