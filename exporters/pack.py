"""Sibling MatMuls packed into one: MatMuls that read the same activation with constant 2-D weights (q/k/v,
gate/up) become one MatMul on the weights concatenated along N, as onnxruntime-genai's model builder lays
them out. A packed q/k/v feeding a GroupQueryAttention goes in as its packed-QKV input (no Split); other
packs are cut back apart with one Split.

Exact: every output column is the same dot product as before, and weight-only quantization (MatMulNBits)
rounds each column's blocks along K on their own, so a packed int4 weight holds the same numbers as the
separate ones. Fewer, larger MatMuls per decode step: the builder's int4 graph runs one MatMulNBits for
q/k/v and one for gate/up per layer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

__all__ = ["pack_sibling_matmuls"]


def _constant_weight(node: ir.Node) -> np.ndarray | None:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    w = node.inputs[1]
    if w is None or w.const_value is None or w.shape is None or len(w.shape) != 2 or not w.is_initializer():
        return None
    return w.const_value.numpy()


def _gqa_qkv(outputs: list[ir.Value]) -> ir.Node | None:
    """The GroupQueryAttention whose query, key and value inputs are exactly ``outputs`` (and nothing else
    reads them), or None."""
    if len(outputs) != 3:
        return None
    uses = [list(v.uses()) for v in outputs]
    if any(len(u) != 1 or v.is_graph_output() for u, v in zip(uses, outputs)):
        return None
    node = uses[0][0].node
    if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
        return None
    if [(u[0].node, u[0].idx) for u in uses] != [(node, 0), (node, 1), (node, 2)]:
        return None
    return node


def pack_sibling_matmuls(model: ir.Model, eligible: Callable[[ir.Node], bool] = lambda node: True) -> list[dict]:
    """Pack every group of two or more ``eligible`` MatMuls that share their activation and have constant 2-D
    weights of one dtype and K, in place; returns one record per pack (nodes, widths, how it was cut)."""
    graph = model.graph
    groups: dict[int, list[tuple[ir.Node, np.ndarray]]] = {}
    for node in graph:
        w = _constant_weight(node)
        if w is not None and node.inputs[0] is not None and eligible(node):
            groups.setdefault(id(node.inputs[0]), []).append((node, w))
    packs = []
    for members in groups.values():
        by_kind: dict[tuple, list[tuple[ir.Node, np.ndarray]]] = {}
        for node, w in members:
            by_kind.setdefault((w.dtype.str, w.shape[0]), []).append((node, w))
        for siblings in by_kind.values():
            if len(siblings) >= 2:
                packs.append(_pack(graph, siblings))
    if packs:  # the first pass also drops the separate weights, now unused
        for p in (common_passes.RemoveUnusedNodesPass(), common_passes.TopologicalSortPass()):
            p(model)
    return packs


def _pack(graph: ir.Graph, siblings: list[tuple[ir.Node, np.ndarray]]) -> dict:
    """One pack; ``siblings`` in graph order."""
    nodes = [n for n, _ in siblings]
    widths = [int(w.shape[1]) for _, w in siblings]
    first = nodes[0]
    name = f"{first.name}/packed"
    packed = np.ascontiguousarray(np.concatenate([w for _, w in siblings], axis=1))
    weight = ir.Value(name=f"{name}.weight", shape=ir.Shape(packed.shape), type=ir.TensorType(first.inputs[1].dtype),
                      const_value=ir.tensor(packed, name=f"{name}.weight"))
    graph.register_initializer(weight)
    x = first.inputs[0]
    matmul = ir.node("MatMul", [x, weight], name=name)
    out = matmul.outputs[0]
    out.name, out.type = f"{name}/output_0", first.outputs[0].type
    if x.shape is not None:
        out.shape = ir.Shape([*x.shape[:-1], sum(widths)])
    olds = [n.outputs[0] for n in nodes]
    gqa = _gqa_qkv(olds)
    if gqa is not None:
        graph.insert_before(gqa, matmul)
        gqa.replace_input_with(0, out)
        gqa.replace_input_with(1, None)
        gqa.replace_input_with(2, None)
        how = "GroupQueryAttention packed QKV"
    else:
        split_sizes = ir.Value(name=f"{name}.split", shape=ir.Shape([len(widths)]), type=ir.TensorType(ir.DataType.INT64),
                               const_value=ir.tensor(np.array(widths, dtype=np.int64), name=f"{name}.split"))
        graph.register_initializer(split_sizes)
        split = ir.node("Split", [out, split_sizes], {"axis": -1}, num_outputs=len(widths), name=f"{name}/Split")
        for new, old in zip(split.outputs, olds):
            new.name, new.type, new.shape = f"{name}/Split/{old.name}", old.type, old.shape
        graph.insert_after(nodes[-1], [matmul, split])  # siblings come in graph order: after the last of them
        for new, old in zip(split.outputs, olds):
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        how = "Split"
    for n in nodes:
        for i in range(len(n.inputs)):
            n.replace_input_with(i, None)  # the separate weights lose their last use and are dropped
        graph.remove(n, safe=True)
    return {"node": name, "packed": [n.name for n in nodes], "widths": widths, "cut": how}
