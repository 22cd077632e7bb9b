"""Rewrite each mapped dense MatMul(x, W) of an exported model into the structured lowering from ops.

Matches: the nodes named in ``matmul_map.json`` (recorded at export) for modules in the factor map.
Afterwards: every such node is gone, its output is produced by ``ops.lowering.lower_structured``
(Reshape/Transpose/MatMul on the factors), a Gemm's bias is re-added with an Add, and the dense
weight initializer (and its Transpose, for a tied head) is dropped once nothing else reads it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.ops.lowering import lower_structured
from procrustes_onnx.ops.spec import factor_shapes, validate_spec

__all__ = ["RewriteStructuredMatmulsPass", "normalize_factor_map", "promised_saving"]

logger = logging.getLogger(__name__)


def normalize_factor_map(factor_map: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """module -> {"spec": validated spec, "factors": name -> float ndarray, or a `FactorLoader`, "dtype"} from
    ``materialize_dense``'s factor map (torch tensors), plain dicts of numpy arrays, or a checkpoint's deferred
    map (`load_stand_ins`: each module's factors read only when the rewritten model is written)."""
    out = {}
    for name, entry in factor_map.items():
        if "spec" not in entry or "factors" not in entry:
            raise UserError(f"factor map entry {name!r} needs 'spec' and 'factors'; build it with materialize_dense")
        if callable(entry["factors"]):
            out[name] = {"spec": validate_spec(entry["spec"]), "factors": entry["factors"],
                         "dtype": np.dtype(entry["dtype"])}
            continue
        factors = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
                   for k, v in entry["factors"].items()}
        dtypes = sorted({str(v.dtype) for v in factors.values()})
        if len(dtypes) != 1:
            raise UserError(f"factor map entry {name!r} mixes dtypes {dtypes}: export and compress in one dtype")
        out[name] = {"spec": validate_spec(entry["spec"]), "factors": factors, "dtype": np.dtype(dtypes[0])}
    return out


def promised_saving(factor_map: Mapping[str, Mapping[str, Any]]) -> int:
    """Bytes the rewrite removes: the dense in x out weight minus the factors, per structured module
    (in the factors' dtype, which ``_check`` makes equal to the ONNX weight's)."""
    total = 0
    for entry in normalize_factor_map(factor_map).values():
        spec, item = entry["spec"], entry["dtype"].itemsize
        total += item * (spec["in"] * spec["out"] - sum(int(np.prod(s)) for s in factor_shapes(spec).values()))
    return total


class RewriteStructuredMatmulsPass(ir.passes.InPlacePass):
    """Replace the MatMul/Gemm of each factor-map module by its structured lowering.

    Attributes:
        matmul_map: the exporter's map (module -> node, op, weight, transposed, transpose_node, shape, dtype).
        factor_map: module -> {"spec", "factors"} (see ``normalize_factor_map``).
    A module of the factor map that the map or graph lacks, or whose weight disagrees in shape or dtype
    with the spec, is a ``UserError``: rewriting only part of a model silently would ship the wrong file.
    """

    def __init__(self, matmul_map: Mapping[str, Mapping[str, Any]], factor_map: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__()
        self.matmul_map = matmul_map
        self.factor_map = normalize_factor_map(factor_map)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {n.name: n for n in graph if n.name}
        position = {name: i for i, name in enumerate(nodes)}
        # in graph order, whatever the factor map's order: the same file from every route to it
        order = sorted(self.factor_map, key=lambda m: position.get((self.matmul_map.get(m) or {}).get("node"), -1))
        modified = False
        for module in order:
            modified |= self._try_rewrite(graph, nodes, module, self.factor_map[module])
        return ir.passes.PassResult(model, modified)

    def _check(self, graph: ir.Graph, nodes: dict[str, ir.Node], module: str, entry: dict) -> ir.Node:
        where = self.matmul_map.get(module)
        if where is None:
            raise UserError(f"factor-map module {module!r} is not in matmul_map.json; export the matching model")
        node = nodes.get(where["node"])
        if node is None or node.op_type != where["op"]:
            raise UserError(f"graph has no {where['op']} node {where['node']!r} for {module}; "
                            f"the ONNX file does not match its matmul_map.json")
        init = graph.initializers.get(where["weight"])
        if init is None or init.const_value is None:
            raise UserError(f"initializer {where['weight']!r} of {module} is missing from the ONNX file; "
                            f"re-export the model")
        spec = entry["spec"]
        shape = [int(d) for d in init.shape]
        if where["transposed"] is False:
            shape = shape[::-1]
        if shape != [spec["in"], spec["out"]]:
            raise UserError(f"{module}: ONNX weight is {shape} (in x out) but the factor map's spec is "
                            f"[{spec['in']}, {spec['out']}]; use the factor map of the exported model")
        if entry["dtype"] != np.dtype(init.dtype.numpy()):
            raise UserError(f"{module}: its factors are {entry['dtype']} but the ONNX weight is "
                            f"{init.dtype.name}; export and compress in the same dtype")
        return node

    def _try_rewrite(self, graph: ir.Graph, nodes: dict[str, ir.Node], module: str, entry: dict) -> bool:
        node = self._check(graph, nodes, module, entry)
        where = self.matmul_map[module]
        x, weight = node.inputs[0], node.inputs[1]
        new_nodes, inits, y = lower_structured(x, entry["spec"], entry["factors"], module)
        for v in inits:
            graph.register_initializer(v)
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            add = ir.node("Add", [y, node.inputs[2]], name=f"{module}/Add_bias")
            add.outputs[0].type = y.type
            new_nodes.append(add)
            y = add.outputs[0]
        ir.convenience.replace_nodes_and_values(graph, insertion_point=node, old_nodes=[node],
                                                new_nodes=new_nodes, old_values=[node.outputs[0]], new_values=[y])
        self._drop_dense(graph, weight, where)
        logger.debug("rewrote %s as %s (%d nodes)", module, entry["spec"]["kind"], len(new_nodes))
        return True

    @staticmethod
    def _drop_dense(graph: ir.Graph, weight: ir.Value, where: Mapping[str, Any]) -> None:
        """Remove the Transpose feeding the MatMul and the dense initializer, if nothing else uses them."""
        producer = weight.producer()
        if producer is not None and producer.op_type == "Transpose" and not list(weight.uses()) \
                and not weight.is_graph_output():
            graph.remove(producer, safe=True)
        init = graph.initializers.get(where["weight"])
        if init is not None and not list(init.uses()) and not init.is_graph_output():
            graph.initializers.pop(init.name)
