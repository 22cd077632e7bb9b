"""Weight-only quantization simulated in torch, for quantization-aware healing.

ONNX Runtime's ``MatMulNBitsQuantizer`` (what ``export --quantize`` runs) rounds every constant 2-D MatMul
weight [K, N] in blocks of ``block_size`` consecutive rows of K, one scale (and zero point) per block and
column. A healed model that has only ever seen its float weights has no margin for that second error
(docs/deploy.md: healed W-GS went 216 -> 962 at int4). Here the same rounding is applied to the torch
parameters, laid out as the ONNX lowering lays them out (``ops.lowering``: GS blocks with their rows
reordered, Kronecker factors pre-permuted, nn.Linear transposed), so training sees the deployed weights.

Training uses the straight-through estimator by swapping data: inside ``quantized_weights`` every target
parameter holds its rounded value; the gradient computed there is applied, outside, to the float value.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.ops import DenseMatrix, GSMatrix, KroneckerSum, kron_factor_layouts
from procrustes_onnx.ops.lowering import gs_layouts

from .skips import Shortcut

__all__ = ["WeightQuant", "QuantTarget", "rtn_blockwise", "quant_targets", "quantized_weights", "QUANT_CHOICES"]

QUANT_CHOICES = ("none", "int4", "int8")


@dataclass(frozen=True)
class WeightQuant:
    """The rounding ``export --quantize`` applies (the same defaults as exporters.quantize.QuantizeConfig)."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    min_elements: int = 4096     # smaller weights stay float in the exporter: here too

    @classmethod
    def named(cls, name: str, block_size: int = 32) -> "WeightQuant | None":
        if name not in QUANT_CHOICES:
            raise UserError(f"--heal-quantize {name!r} is not one of {', '.join(QUANT_CHOICES)}")
        return None if name == "none" else cls(bits=int(name[3:]), block_size=block_size)

    def covers(self, k: int, n: int) -> bool:
        """Whether the exporter quantizes a [K, N] MatMul weight (exporters.quantize._plan's rule)."""
        return k >= self.block_size and k * n >= self.min_elements


@dataclass
class QuantTarget:
    """One 2-D weight as ONNX stores it: ``index[k, n]`` is the flat position in ``param`` of row k, column n."""

    name: str
    param: nn.Parameter
    index: torch.Tensor


def rtn_blockwise(m: torch.Tensor, quant: WeightQuant) -> torch.Tensor:
    """Round-to-nearest of ``m`` [K, N] in blocks of ``block_size`` rows, dequantized (MLAS's blockwise
    quantizer: symmetric maps the block's largest-magnitude value to the most negative level)."""
    k, n = m.shape
    b = quant.block_size
    pad = (-k) % b
    x = torch.cat([m, m.new_zeros(pad, n)]) if pad else m
    x = x.reshape(-1, b, n)
    levels = 2 ** quant.bits
    if quant.symmetric:
        idx = x.abs().argmax(dim=1, keepdim=True)
        peak = torch.gather(x, 1, idx)
        scale = -peak / (levels // 2)
        inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.clamp(torch.round(x * inv), -(levels // 2), levels // 2 - 1)
        y = q * scale
    else:
        lo = torch.clamp(x.amin(dim=1, keepdim=True), max=0.0)
        hi = torch.clamp(x.amax(dim=1, keepdim=True), min=0.0)
        scale = (hi - lo) / (levels - 1)
        inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
        zero = torch.clamp(torch.round(-lo * inv), 0, levels - 1)
        q = torch.clamp(torch.round(x * inv) + zero, 0, levels - 1)
        y = (q - zero) * scale
    return y.reshape(-1, n)[:k]


def _arange(p: torch.Tensor) -> torch.Tensor:
    return torch.arange(p.numel()).reshape(p.shape)


def _layouts(module: nn.Module) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    """The ONNX MatMul weights [K, N] of one module, as index maps into its parameters."""
    if isinstance(module, nn.Linear):
        return [("weight", module.weight, _arange(module.weight).T)]
    if isinstance(module, nn.Embedding):  # the table's blocks run along the hidden axis, as a tied head's K
        return [("weight", module.weight, _arange(module.weight).T)]
    if isinstance(module, (DenseMatrix, Shortcut)):
        return [("weight", module.weight, _arange(module.weight))]
    if isinstance(module, GSMatrix):
        lay = gs_layouts(_arange(module.left).numpy(), _arange(module.right).numpy(), 1)
        out = [(f"left[{i}]", module.left, torch.from_numpy(np.ascontiguousarray(block)))
               for i, block in enumerate(lay["gs_left"])]
        return out + [(f"right[{j}]", module.right, torch.from_numpy(np.ascontiguousarray(block)))
                      for j, block in enumerate(lay["gs_right"])]
    if isinstance(module, KroneckerSum):
        first, second = kron_factor_layouts(_arange(module.a), _arange(module.b), module.order)
        a_first = module.order == "a_first"
        return [("a" if a_first else "b", module.a if a_first else module.b, first),
                ("b" if a_first else "a", module.b if a_first else module.a, second)]
    return []


def quant_targets(model: nn.Module, quant: WeightQuant) -> list[QuantTarget]:
    """Every weight the exporter would quantize, once each (a tied head is its token table)."""
    out, seen = [], set()
    for name, module in model.named_modules():
        for key, param, index in _layouts(module):
            if (id(param), key) in seen or not quant.covers(*index.shape):
                continue
            seen.add((id(param), key))
            out.append(QuantTarget(f"{name}.{key}", param, index.to(torch.int32)))  # half the memory of int64
    return out


@torch.no_grad()
def _rounded(targets: list[QuantTarget], quant: WeightQuant) -> dict[int, torch.Tensor]:
    values: dict[int, torch.Tensor] = {}
    for t in targets:
        flat = values.setdefault(id(t.param), t.param.detach().clone(memory_format=torch.contiguous_format)).view(-1)
        idx = t.index.to(flat.device, torch.int64)
        flat[idx.reshape(-1)] = rtn_blockwise(flat[idx].float(), quant).to(flat.dtype).reshape(-1)
    return values


@contextlib.contextmanager
def quantized_weights(targets: list[QuantTarget], quant: WeightQuant | None):
    """Inside: every target parameter holds its rounded value (forward, backward and scoring see the
    deployed weights); on exit the float values come back, so an optimizer step after it updates them with
    the gradient taken at the rounded point (the straight-through estimator)."""
    if quant is None or not targets:
        yield
        return
    params = {id(t.param): t.param for t in targets}
    floats = {k: p.data for k, p in params.items()}
    try:
        for k, value in _rounded(targets, quant).items():
            params[k].data = value
        yield
    finally:
        for k, p in params.items():
            p.data = floats[k]
