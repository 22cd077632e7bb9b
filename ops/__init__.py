"""Structured matrices (Kronecker sums, GS, dense), their projections, ONNX lowering and shape planning.

Convention: row vectors, y = x @ W, W is in x out (the transpose of nn.Linear.weight).
"""

from .base import StructuredMatrix
from .dense import DenseMatrix
from .gs import GSMatrix, gs_apply, gs_channels, gs_materialize, shuffle_perm
from .kron import KroneckerSum, kron_apply, kron_factor_layouts, kron_macs, kron_materialize, kron_order
from .linalg import projection_error, spd_solve, torch_threads, weighted_sq_error
from .linear import StructuredLinear
from .project import project_factors, project_to_spec
from .project_gs import gs_discarded_sq, project_gs, project_gs_weighted
from .project_kron import kron_rearrange, project_kronecker, project_kronecker_weighted
from .spec import KINDS, factor_shapes, structured_from_spec, validate_spec

__all__ = [
    "StructuredMatrix", "DenseMatrix", "GSMatrix", "KroneckerSum", "StructuredLinear",
    "structured_from_spec", "factor_shapes", "validate_spec", "KINDS",
    "kron_apply", "kron_factor_layouts", "kron_macs", "kron_materialize", "kron_order", "kron_rearrange",
    "gs_apply", "gs_channels", "gs_materialize", "shuffle_perm", "gs_discarded_sq",
    "project_kronecker", "project_kronecker_weighted", "project_gs", "project_gs_weighted",
    "project_factors", "project_to_spec", "projection_error", "weighted_sq_error", "spd_solve", "torch_threads",
]
