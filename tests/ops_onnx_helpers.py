"""Shared helper for the ops ONNX tests: wrap one lowered structured matmul in a model and run it in ORT."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from procrustes_onnx.ops.lowering import lower_structured

OPSET = 18


def build_model(spec: dict, factors: dict, lead: int, dtype=ir.DataType.FLOAT, name: str = "layer0/q_proj") -> ir.Model:
    """Graph with input x [d0, ..., in] (symbolic leading dims) and output y = x @ W via the lowering."""
    dims = [f"d{i}" for i in range(lead)] + [spec["in"]]
    x = ir.Value(name="x", shape=ir.Shape(dims), type=ir.TensorType(dtype))
    nodes, inits, y = lower_structured(x, spec, factors, name)
    y.name = "y"
    graph = ir.Graph([x], [y], nodes=nodes, opset_imports={"": OPSET}, name="structured")
    for v in inits:
        graph.register_initializer(v)
    return ir.Model(graph, ir_version=10)


def run_model(model: ir.Model, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """Run through ONNX Runtime CPU with graph optimizations on (as deployment would)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]
