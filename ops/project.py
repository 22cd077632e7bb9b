"""One entry point for the compressor: project a dense W onto the class a spec names, plain or weighted."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from procrustes_onnx.core.errors import UserError

from .base import StructuredMatrix
from .project_gs import project_gs, project_gs_weighted
from .project_kron import project_kronecker, project_kronecker_weighted
from .spec import structured_from_spec, validate_spec

__all__ = ["project_to_spec", "project_factors"]


def project_factors(m: torch.Tensor, spec: Mapping, gram: torch.Tensor | None = None, *,
                    sweeps: int | None = None, init: Mapping[str, torch.Tensor] | None = None,
                    ) -> dict[str, torch.Tensor]:
    """Factors (names as in `factors()`) of the projection of M [in, out] onto `spec`'s class.

    gram=None gives the Frobenius projection; otherwise the weighted one for C = X^T X, started at
    `init` (e.g. the previous ALS iterate) or at the Frobenius projection.
    """
    s = validate_spec(spec)
    kw = {} if sweeps is None else {"sweeps": sweeps}
    if s["kind"] == "dense":
        if tuple(m.shape) != (s["in"], s["out"]):
            raise UserError(f"dense spec is {s['in']}x{s['out']} but M is {tuple(m.shape)}")
        return {"weight": m}
    if s["kind"] == "kron":
        args = (s["rank"], s["a_shape"], s["b_shape"])
        if gram is None:
            a, b = project_kronecker(m, *args)
        else:
            start = (init["a"], init["b"]) if init is not None else None
            a, b = project_kronecker_weighted(m, gram, *args, init=start, **kw)
        return {"a": a, "b": b}
    args = (*s["left"], *s["right"])
    if gram is None:
        left, right = project_gs(m, *args)
    else:
        start = (init["left"], init["right"]) if init is not None else None
        left, right = project_gs_weighted(m, gram, *args, init=start, **kw)
    return {"left": left, "right": right}


def project_to_spec(m: torch.Tensor, spec: Mapping, gram: torch.Tensor | None = None, **kw) -> StructuredMatrix:
    """The structured matrix nearest to M (see `project_factors`), built by `structured_from_spec`, the one
    kind -> class table."""
    return structured_from_spec(spec, project_factors(m, spec, gram, **kw))
