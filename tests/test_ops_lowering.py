"""ONNX lowering of structured matmuls, run in ONNX Runtime against numpy x @ W (float64 reference)."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.ops import DenseMatrix, GSMatrix, KroneckerSum
from procrustes_onnx.ops.linalg import torch_threads
from procrustes_onnx.ops.lowering import lower_structured, standalone_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Small float64 solves: 1 thread avoids OpenMP stalls on a shared machine (see torch_threads)."""
    with torch_threads(1):
        yield


ALLOWED = {"Reshape", "Transpose", "MatMul"}


def build_model(spec: dict, factors: dict, lead: int, dtype=ir.DataType.FLOAT, name: str = "layer0/q_proj") -> ir.Model:
    return standalone_model(spec, factors, lead, dtype, name)


def run_model(model: ir.Model, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """Run through ONNX Runtime CPU with graph optimizations on (as deployment would)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _check(mat, lead: tuple[int, ...], seed: int, tol: float = 1e-5, gs_blocks: bool = False) -> list[str]:
    f = {k: v.detach().numpy() for k, v in mat.factors().items()}
    model = standalone_model(mat.spec(), f, len(lead), name="layer0/q_proj", gs_blocks=gs_blocks)
    x = np.random.default_rng(seed).standard_normal((*lead, mat.in_features)).astype(np.float32)
    ref = x.astype(np.float64) @ mat.materialize().detach().double().numpy()
    y = run_model(model, x)
    assert y.shape == ref.shape
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < tol, (mat.spec(), lead)
    ops = [n.op_type for n in model.graph]
    assert set(ops) <= ALLOWED | ({"Split", "Concat"} if gs_blocks else set()), ops
    return ops


leads = st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple)
small = st.integers(1, 5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(r=small, m1=small, n1=small, m2=small, n2=small, lead=leads, seed=st.integers(0, 2**16))
def test_kron_lowering_property(r, m1, n1, m2, n2, lead, seed):
    g = torch.Generator().manual_seed(seed)
    mat = KroneckerSum(torch.randn(r, m1, n1, generator=g), torch.randn(r, m2, n2, generator=g))
    _check(mat, lead, seed)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kl=small, bl1=small, bl2=small, kr=small, br2=small, lead=leads, seed=st.integers(0, 2**16))
def test_gs_lowering_property(kl, bl1, bl2, kr, br2, lead, seed):
    n = kl * bl2
    kr = kr if n % kr == 0 else 1          # need kr | kl*bl2; both uniform (kr | bl2) and ragged shuffles occur
    g = torch.Generator().manual_seed(seed)
    mat = GSMatrix(torch.randn(kl, bl1, bl2, generator=g), torch.randn(kr, n // kr, br2, generator=g))
    _check(mat, lead, seed)
    ops = _check(mat, lead, seed, gs_blocks=True)
    matmuls = [o for o in ops if o == "MatMul"]
    assert len(matmuls) == kl + kr  # one 2-D MatMul per block, what MatMulNBits can take


def test_gs_blocks_weights_are_2d():
    g = torch.Generator().manual_seed(1)
    mat = GSMatrix(torch.randn(4, 6, 8, generator=g), torch.randn(4, 8, 5, generator=g))
    f = {k: v.numpy() for k, v in mat.factors().items()}
    model = standalone_model(mat.spec(), f, 2, gs_blocks=True)
    weights = [n.inputs[1] for n in model.graph if n.op_type == "MatMul"]
    assert [tuple(w.shape) for w in weights] == [(6, 8)] * 4 + [(8, 5)] * 4


@pytest.mark.parametrize("lead", [(1, 1), (1, 7), (2, 5)])
def test_paper_shapes_single_token_and_batch(lead):
    g = torch.Generator().manual_seed(0)
    d, n, q, r = 48, 32, 4, 3
    k_in = KroneckerSum(torch.randn(r, q, 1, generator=g), torch.randn(r, d // q, n, generator=g))
    k_out = KroneckerSum(torch.randn(r, 1, q, generator=g), torch.randn(r, n, d // q, generator=g))
    gs = GSMatrix(torch.randn(4, 12, 12, generator=g), torch.randn(2, 24, 16, generator=g))
    ragged = GSMatrix(torch.randn(4, 12, 6, generator=g), torch.randn(8, 3, 4, generator=g))
    dense = DenseMatrix(torch.randn(d, n, generator=g))
    # Input-rotated Kronecker needs one real Transpose; output-rotated one; GS three (uniform) or four.
    assert _check(k_in, lead, 1).count("Transpose") == 1
    assert _check(k_out, lead, 2).count("Transpose") == 1
    assert _check(gs, lead, 3).count("Transpose") == 3
    assert _check(ragged, lead, 4).count("Transpose") == 4
    assert _check(dense, lead, 5) == ["MatMul"]


def test_names_and_checker(tmp_path):
    g = torch.Generator().manual_seed(0)
    mat = KroneckerSum(torch.randn(2, 4, 1, generator=g), torch.randn(2, 6, 5, generator=g))
    model = build_model(mat.spec(), {k: v.detach().numpy() for k, v in mat.factors().items()}, 2,
                        name="/model/layers.0/attn/q_proj")
    assert all(n.name.startswith("/model/layers.0/attn/q_proj/") for n in model.graph)
    assert {"/model/layers.0/attn/q_proj/kron_a", "/model/layers.0/attn/q_proj/kron_b"} <= set(model.graph.initializers)
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    onnx.checker.check_model(onnx.load(path), full_check=True)


def test_float64_input_keeps_dtype():
    g = torch.Generator().manual_seed(0)
    mat = GSMatrix(torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(4, 2, 3, generator=g, dtype=torch.float64))
    f = {k: v.numpy() for k, v in mat.factors().items()}
    model = build_model(mat.spec(), f, 2, dtype=ir.DataType.DOUBLE)
    x = np.random.default_rng(0).standard_normal((2, 3, 6))
    y = run_model(model, x)
    assert y.dtype == np.float64
    assert np.linalg.norm(y - x @ mat.materialize().numpy()) / np.linalg.norm(y) < 1e-12


def test_bad_inputs():
    spec = {"kind": "dense", "in": 4, "out": 3}
    x = ir.Value(name="x", shape=ir.Shape([1, 5]), type=ir.TensorType(ir.DataType.FLOAT))
    with pytest.raises(UserError):
        lower_structured(x, spec, {"weight": np.zeros((4, 3), np.float32)}, "l")      # 5 != 4
    x4 = ir.Value(name="x", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    with pytest.raises(UserError):
        lower_structured(x4, spec, {"weight": np.zeros((3, 4), np.float32)}, "l")     # factor shape
    with pytest.raises(UserError):
        lower_structured(ir.Value(name="x"), spec, {"weight": np.zeros((4, 3), np.float32)}, "l")  # no rank


@pytest.mark.parametrize("mat", [
    KroneckerSum(torch.randn(3, 4, 2), torch.randn(3, 5, 6)),     # a_first or b_first, whichever the plan picks
    KroneckerSum(torch.randn(2, 6, 5), torch.randn(2, 2, 4)),
    KroneckerSum(torch.randn(1, 2, 2), torch.randn(1, 3, 2)),     # b_first
    GSMatrix(torch.randn(4, 6, 6), torch.randn(3, 8, 5)),         # kr divides bl2: rows reordered
    GSMatrix(torch.randn(2, 5, 3), torch.randn(3, 2, 4)),         # the general shuffle
    DenseMatrix(torch.randn(7, 3)),
], ids=["kron", "kron2", "kron-b-first", "gs", "gs-shuffle", "dense"])
@pytest.mark.parametrize("lead", [1, 2, 3])
def test_deferred_factors_give_the_same_model(mat, lead):
    """A loader instead of arrays: the same nodes and initializers (shapes before anything is read, bytes when
    written), and the loader runs only when a weight's bytes are asked for."""
    f = {k: v.detach().numpy() for k, v in mat.factors().items()}
    calls = []

    def load(names=None):
        calls.append(names)
        return {k: v for k, v in f.items() if names is None or k in names}

    dims = [f"d{i}" for i in range(lead)] + [mat.in_features]
    x = ir.Value(name="x", shape=ir.Shape(dims), type=ir.TensorType(ir.DataType.FLOAT))
    eager = lower_structured(x, mat.spec(), f, "m")
    lazy = lower_structured(x, mat.spec(), load, "m")
    assert [n.op_type for n in eager[0]] == [n.op_type for n in lazy[0]]
    assert not calls
    assert [(v.name, tuple(v.shape), v.const_value.nbytes) for v in eager[1]] == \
        [(v.name, tuple(v.shape), v.const_value.nbytes) for v in lazy[1]]
    assert not calls
    for a, b in zip(eager[1], lazy[1]):
        assert a.const_value.tobytes() == b.const_value.tobytes(), a.name
    assert calls and all(len(names) == 1 for names in calls)  # each weight reads only its own factor
