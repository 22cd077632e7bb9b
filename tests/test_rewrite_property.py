"""Property: any valid Kronecker/GS/dense spec with random factors, rewritten into a one-MatMul (or
one-Gemm) graph by RewriteStructuredMatmulsPass, passes the ONNX checker and matches numpy x @ W."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procrustes_onnx.exporters import RewriteStructuredMatmulsPass
from procrustes_onnx.ops import structured_from_spec

RTOL = 1e-5  # float32, one structured product of at most a few hundred terms


@st.composite
def specs(draw) -> dict:
    kind = draw(st.sampled_from(["kron", "gs", "dense"]))
    small = st.integers(1, 6)
    if kind == "kron":
        return {"kind": "kron", "rank": draw(st.integers(1, 3)), "a_shape": [draw(small), draw(small)],
                "b_shape": [draw(small), draw(small)]}
    if kind == "gs":
        kl, bl1, bl2 = draw(small), draw(small), draw(small)
        kr = draw(st.sampled_from([d for d in range(1, kl * bl2 + 1) if (kl * bl2) % d == 0]))
        return {"kind": "gs", "left": [kl, bl1, bl2], "right": [kr, kl * bl2 // kr, draw(small)]}
    return {"kind": "dense", "in": draw(st.integers(1, 12)), "out": draw(st.integers(1, 12))}


def one_layer_graph(w: np.ndarray, op: str, bias: np.ndarray | None) -> tuple[ir.Model, dict]:
    """x [b, t, in] -> MatMul(x, W) (or 2-D x -> Gemm(x, W^T, bias, transB=1)) -> y, and its matmul map."""
    n_in, n_out = w.shape
    dims = ["b", "t", n_in] if op == "MatMul" else ["n", n_in]
    x = ir.Value(name="x", shape=ir.Shape(dims), type=ir.TensorType(ir.DataType.FLOAT))
    stored = w if op == "MatMul" else np.ascontiguousarray(w.T)
    wv = ir.Value(name="lin.weight", shape=ir.Shape(stored.shape), type=ir.TensorType(ir.DataType.FLOAT),
                  const_value=ir.tensor(stored, name="lin.weight"))
    inputs = [x, wv]
    if op == "Gemm":
        inputs.append(ir.Value(name="lin.bias", shape=ir.Shape([n_out]), type=ir.TensorType(ir.DataType.FLOAT),
                               const_value=ir.tensor(bias, name="lin.bias")))
    node = ir.node(op, inputs, {"transB": 1} if op == "Gemm" else None, name=f"/lin/{op}")
    y = node.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(dims[:-1] + [n_out])
    graph = ir.Graph([x], [y], nodes=[node], opset_imports={"": 18}, name="one_layer")
    for v in inputs[1:]:
        graph.register_initializer(v)
    entry = {"node": node.name, "op": op, "weight": "lin.weight", "transposed": op == "MatMul",
             "transpose_node": None, "shape": [n_in, n_out], "dtype": "FLOAT", "bias": None}
    return ir.Model(graph, ir_version=10), {"lin": entry}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), op=st.sampled_from(["MatMul", "Gemm"]), seed=st.integers(0, 2**16))
def test_random_structures_pass_checker_and_match_numpy(spec, op, seed):
    gen = torch.Generator().manual_seed(seed)
    zeros = structured_from_spec(spec)
    factors = {k: torch.randn(v.shape, generator=gen) for k, v in zeros.factors().items()}
    matrix = structured_from_spec(spec, factors)
    w = matrix.materialize().numpy().astype(np.float32)
    rng = np.random.default_rng(seed)
    bias = rng.standard_normal(w.shape[1]).astype(np.float32)
    model, mapping = one_layer_graph(w, op, bias)
    result = RewriteStructuredMatmulsPass(mapping, {"lin": {"spec": spec, "factors": factors}})(model)
    assert result.modified
    assert "lin.weight" not in model.graph.initializers
    assert all(n.op_type != op or n.name != f"/lin/{op}" for n in model.graph)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    x = rng.standard_normal((2, 3, w.shape[0]) if op == "MatMul" else (5, w.shape[0])).astype(np.float32)
    got = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ w.astype(np.float64) + (bias if op == "Gemm" else 0.0)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= RTOL * max(np.abs(ref).max(), 1.0)
