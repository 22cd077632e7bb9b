"""Record which ONNX MatMul computes which torch Linear, from the exporter's node metadata.

The dynamo exporter's optimizer pre-transposes Linear weights into anonymous initializers
(``val_87``), so names cannot be matched afterwards. Every node, however, carries
``pkg.torch.onnx.name_scopes`` (the module path it was traced in); the innermost module entry of a
MatMul whose right operand is a constant is the Linear that owns that weight.
"""

from __future__ import annotations

import ast
import logging
import re
from typing import Any

import onnx_ir as ir

__all__ = ["SCOPE_KEY", "module_scope", "constant_weight", "record_matmul_map"]

logger = logging.getLogger(__name__)

SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def module_scope(node: ir.Node, prefix: str = "") -> str | None:
    """The innermost module path of ``node`` (the scopes list ends with the aten op's own name)."""
    raw = node.metadata_props.get(SCOPE_KEY)
    if not raw:
        return None
    scopes = [s for s in ast.literal_eval(raw) if s]
    if len(scopes) < 2:
        return None
    name = scopes[-2]
    if len(scopes) >= 3 and not name.startswith(scopes[-3] + "."):
        # a module called from a swapped-in forward (exporters.gqa) may be scoped by its attribute name alone
        name = f"{scopes[-3]}.{name}"
    name = _unslice(name)
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]
    return name


_SLICE = re.compile(r"\.slice\((None|-?\d+), (None|-?\d+), (None|-?\d+)\)\.(\d+)")


def _unslice(name: str) -> str:
    """``layers.slice(None, 2, None).1`` -> ``layers.1``: a module reached through a sliced ModuleList
    (``self.layers[:n]``) is sometimes scoped by the slice; map it back to its own path."""
    def repl(m: re.Match) -> str:
        start = 0 if m[1] == "None" else int(m[1])
        step = 1 if m[3] == "None" else int(m[3])
        return f".{start + step * int(m[4])}"
    return _SLICE.sub(repl, name)


def constant_weight(value: ir.Value) -> tuple[ir.Value, ir.Node | None] | None:
    """(initializer, transpose node or None) if ``value`` is an initializer or Transpose(initializer)."""
    if value.is_initializer() and value.const_value is not None:
        return value, None
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.inputs[0] is not None:
        src = producer.inputs[0]
        if src.is_initializer() and src.const_value is not None and len(src.shape or ()) == 2:
            return src, producer
    return None


def _trans_b(node: ir.Node) -> bool:
    return node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1


def _gemm_weight(node: ir.Node) -> tuple[ir.Value, None] | None:
    """Gemm(x, W, b) with x 2-D, alpha = beta = 1 and transA = 0 is a Linear the rewrite can handle."""
    a = node.attributes
    if a.get_int("transA", 0) or a.get_float("alpha", 1.0) != 1.0 or a.get_float("beta", 1.0) != 1.0:
        return None
    w = node.inputs[1]
    return (w, None) if w.is_initializer() and w.const_value is not None else None


def _gemm_bias(node: ir.Node) -> str | None:
    b = node.inputs[2] if len(node.inputs) > 2 else None
    return b.name if b is not None and b.is_initializer() else None


def _bias_of(node: ir.Node) -> str | None:
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    for v in uses[0].node.inputs:
        if v is not None and v is not node.outputs[0] and v.is_initializer():
            return v.name
    return None


def record_matmul_map(model: ir.Model, modules: set[str] | None = None, *, prefix: str = "model.",
                      rename: bool = True) -> dict[str, dict[str, Any]]:
    """Map module name -> {node, op, weight, transposed, transpose_node, shape, dtype, bias} per MatMul/Gemm.

    ``shape`` is always the MatMul layout (in x out). ``transposed`` is True when the initializer holds
    ``Linear.weight.T`` (in x out); False when it holds ``Linear.weight`` itself and either a Transpose
    node feeds the MatMul (tied heads) or the op is ``Gemm(transB=1)`` (OPT's 2-D fc1/fc2).
    With ``rename`` the MatMul becomes ``/{module}/MatMul`` and a MatMul-layout weight
    ``{module}.weight_t``, so profiles and the map read the same names. ``modules`` restricts the
    map to those names (e.g. the model's nn.Linear modules and skip matrices).
    """
    found: dict[str, dict[str, Any]] = {}
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.inputs[1] is None:
            continue
        scope = module_scope(node, prefix)
        weight = _gemm_weight(node) if node.op_type == "Gemm" else constant_weight(node.inputs[1])
        if scope is None or weight is None or (modules is not None and scope not in modules):
            continue
        if scope in found:
            logger.debug("module %s has several constant MatMuls; keeping the first", scope)
            continue
        init, transpose = weight
        if rename:
            node.name = f"/{scope}/{node.op_type}"
            if transpose is None and not _trans_b(node) and len(list(init.uses())) == 1 and f"{scope}.weight_t" not in model.graph.initializers:
                init.name = f"{scope}.weight_t"
            if transpose is not None:
                transpose.name = f"/{scope}/Transpose"
        shape = [int(d) for d in init.shape]
        found[scope] = {
            "node": node.name,
            "weight": init.name,
            "op": node.op_type,
            "transposed": transpose is None if node.op_type == "MatMul" else not _trans_b(node),
            "transpose_node": None if transpose is None else transpose.name,
            "shape": shape if (transpose is None and not _trans_b(node)) else shape[::-1],
            "dtype": init.dtype.name,
            "bias": _bias_of(node) if node.op_type == "MatMul" else _gemm_bias(node),
        }
    return found
