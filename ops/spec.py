"""Rebuild a structured matrix from its JSON spec and named factors (the checkpoint format)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from procrustes_onnx.core.errors import UserError

from .base import StructuredMatrix
from .dense import DenseMatrix
from .gs import GSMatrix, check_gs_shapes
from .kron import KroneckerSum

__all__ = ["structured_from_spec", "factor_shapes", "validate_spec", "KINDS"]

KINDS = ("kron", "gs", "dense")


def validate_spec(spec: Mapping) -> dict:
    """Check a spec and return it normalized (with "in"/"out" filled in); UserError if malformed."""
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    try:
        if kind == "kron":
            r = int(spec["rank"])
            (m1, n1), (m2, n2) = (int(v) for v in spec["a_shape"]), (int(v) for v in spec["b_shape"])
            if min(r, m1, n1, m2, n2) < 1:
                raise ValueError
            out = {"kind": "kron", "rank": r, "a_shape": [m1, n1], "b_shape": [m2, n2],
                   "in": m1 * m2, "out": n1 * n2}
        elif kind == "gs":
            kl, bl1, bl2 = (int(v) for v in spec["left"])
            kr, br1, br2 = (int(v) for v in spec["right"])
            check_gs_shapes(kl, bl1, bl2, kr, br1, br2)
            out = {"kind": "gs", "left": [kl, bl1, bl2], "right": [kr, br1, br2],
                   "in": kl * bl1, "out": kr * br2}
        elif kind == "dense":
            out = {"kind": "dense", "in": int(spec["in"]), "out": int(spec["out"])}
            if min(out["in"], out["out"]) < 1:
                raise ValueError
        else:
            raise UserError(f"structured spec kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    except (KeyError, TypeError, ValueError):
        raise UserError(f"malformed {kind} spec {dict(spec)!r}; see ops/spec.py for the fields") from None
    for key in ("in", "out"):
        if key in spec and int(spec[key]) != out[key]:
            raise UserError(f"spec {dict(spec)!r} says {key}={spec[key]} but its shapes give {out[key]}")
    return out


def factor_shapes(spec: Mapping) -> dict[str, tuple[int, ...]]:
    """Factor name -> shape for a spec (what `factors()` of the rebuilt matrix will hold)."""
    s = validate_spec(spec)
    if s["kind"] == "kron":
        return {"a": (s["rank"], *s["a_shape"]), "b": (s["rank"], *s["b_shape"])}
    if s["kind"] == "gs":
        return {"left": tuple(s["left"]), "right": tuple(s["right"])}
    return {"weight": (s["in"], s["out"])}


def structured_from_spec(spec: Mapping, tensors: Mapping[str, torch.Tensor] | None = None,
                         dtype: torch.dtype = torch.float32) -> StructuredMatrix:
    """Build the matrix a spec describes from `tensors` (names as in `factors()`); zeros if None."""
    shapes = factor_shapes(spec)
    if tensors is None:
        tensors = {k: torch.zeros(v, dtype=dtype) for k, v in shapes.items()}
    for name, shape in shapes.items():
        if name not in tensors:
            raise UserError(f"spec {spec.get('kind')} needs tensor {name!r}; got {sorted(tensors)}")
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, spec needs {shape}")
    kind = spec["kind"]
    if kind == "kron":
        return KroneckerSum(tensors["a"], tensors["b"])
    if kind == "gs":
        return GSMatrix(tensors["left"], tensors["right"])
    return DenseMatrix(tensors["weight"])
