"""ONNX lowering of x @ W for structured W: Reshape / Transpose / MatMul nodes on onnx_ir values.

Leading dims of x ([B, T, ...], any count, T = 1 included) are kept with Reshape's 0 ("copy this
dim"), so no Shape/Concat is needed. Factor layouts are precomputed in numpy (pre-permuted, pre-
concatenated), so the graph does two GEMMs for a Kronecker sum and two batched GEMMs for GS, and no
Kronecker product of constants exists for ONNX Runtime's constant folding to densify.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from procrustes_onnx.core.errors import UserError

from .kron import kron_operand, kron_order
from .spec import factor_shapes, validate_spec

__all__ = ["lower_structured", "lower_gs_blocks", "standalone_model", "gs_layouts", "FactorLoader",
           "Deferred"]

FactorLoader = Callable[[Sequence[str] | None], Mapping[str, np.ndarray]]
"""Reads the named factors of one module (names as in `factors()`; None: all) when called: a lowering given one defers
every weight, and each weight reads only the factor it is laid out from."""


@dataclass(frozen=True)
class Deferred:
    """A weight the lowering computes only when the model is written (an ``ir.LazyTensor``), from factors read
    then: a large model's rewrite never holds its factors all at once."""

    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


class _Emitter:
    """Collects nodes and initializers; every name is prefixed with the layer's name."""

    def __init__(self, name: str, lead: int, dtype: ir.DataType) -> None:
        self.name, self.lead, self.dtype = name, lead, dtype
        self.nodes: list[ir.Node] = []
        self.inits: list[ir.Value] = []
        self._n = 0

    def const(self, key: str, arr: np.ndarray) -> ir.Value:
        full = f"{self.name}/{key}"
        t = ir.tensor(np.ascontiguousarray(arr), name=full)
        v = ir.Value(name=full, shape=ir.Shape(arr.shape), type=ir.TensorType(t.dtype), const_value=t)
        self.inits.append(v)
        return v

    def weight(self, key: str, arr: np.ndarray | Deferred) -> ir.Value:
        if not isinstance(arr, Deferred):
            return self.const(key, arr.astype(self.dtype.numpy(), copy=False))  # the factor map's own array if it can
        full, np_dtype = f"{self.name}/{key}", self.dtype.numpy()
        t = ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(arr.make().astype(np_dtype, copy=False)), name=full),
                          self.dtype, ir.Shape(arr.shape), name=full)
        v = ir.Value(name=full, shape=ir.Shape(arr.shape), type=ir.TensorType(self.dtype), const_value=t)
        self.inits.append(v)
        return v

    def op(self, op_type: str, inputs: Sequence[ir.Value], **attrs) -> ir.Value:
        self._n += 1
        node = ir.node(op_type, list(inputs), attrs or None, name=f"{self.name}/{op_type}_{self._n}")
        node.outputs[0].name = f"{self.name}/{op_type}_{self._n}/output_0"
        node.outputs[0].type = ir.TensorType(self.dtype)
        self.nodes.append(node)
        return node.outputs[0]

    def split(self, x: ir.Value, sizes: Sequence[int]) -> list[ir.Value]:
        """Split the last axis into pieces of ``sizes`` (no node for a single piece)."""
        if len(sizes) == 1:
            return [x]
        self._n += 1
        node = ir.node("Split", [x, self.const(f"split_{self._n}", np.array(sizes, dtype=np.int64))], {"axis": -1},
                       num_outputs=len(sizes), name=f"{self.name}/Split_{self._n}")
        for i, out in enumerate(node.outputs):
            out.name = f"{self.name}/Split_{self._n}/output_{i}"
            out.type = ir.TensorType(self.dtype)
        self.nodes.append(node)
        return list(node.outputs)

    def concat(self, parts: Sequence[ir.Value]) -> ir.Value:
        return parts[0] if len(parts) == 1 else self.op("Concat", parts, axis=-1)

    def reshape(self, x: ir.Value, tail: Sequence[int], key: str, lead_first: bool = True) -> ir.Value:
        """Reshape to [<leading dims copied>, *tail] (or [*tail] when lead_first is False)."""
        shape = ([0] * self.lead if lead_first else []) + list(tail)
        return self.op("Reshape", [x, self.const(key, np.array(shape, dtype=np.int64))])

    def swap_last(self, x: ir.Value, rank_tail: int, i: int, j: int) -> ir.Value:
        """Transpose two of the trailing `rank_tail` axes, keeping the leading dims in place."""
        perm = list(range(self.lead + rank_tail))
        perm[self.lead + i], perm[self.lead + j] = perm[self.lead + j], perm[self.lead + i]
        return self.op("Transpose", [x], perm=perm)


def _layouts(spec: dict, lead: int, factors: Mapping[str, np.ndarray] | FactorLoader
             ) -> dict[str, np.ndarray | Deferred]:
    """The weights a lowering multiplies by (the Kronecker GEMM operands of `kron_operand`, the GS blocks of
    `gs_layouts`, or the dense matrix), computed now from arrays, or deferred (`Deferred`, with the shapes the spec
    fixes) when ``factors`` is a loader: then each weight reads only the factor it is laid out from."""
    kind = spec["kind"]
    source = {"weight": "weight", "kron_a": "a", "kron_b": "b", "gs_left": "left", "gs_right": "right"}

    def layout(key: str, f: np.ndarray) -> np.ndarray:
        f = np.asarray(f)
        if kind == "dense":
            return f
        if kind == "kron":
            first = (key == "kron_a") == (kron_order(spec["rank"], *spec["a_shape"], *spec["b_shape"]) == "a_first")
            return kron_operand(torch.from_numpy(np.ascontiguousarray(f)), first).numpy()
        return gs_left_layout(f, lead) if key == "gs_left" else gs_right_layout(f, spec["left"][0], lead)

    shapes = _layout_shapes(spec, lead)
    if not callable(factors):
        return {key: layout(key, factors[source[key]]) for key in shapes}
    return {key: Deferred(shape, lambda key=key: layout(key, factors([source[key]])[source[key]]))
            for key, shape in shapes.items()}


def _layout_shapes(spec: dict, lead: int) -> dict[str, tuple[int, ...]]:
    """The shapes `_layouts` gives, from the spec alone."""
    if spec["kind"] == "dense":
        return {"weight": (spec["in"], spec["out"])}
    if spec["kind"] == "kron":
        r = spec["rank"]
        (m1, n1), (m2, n2) = spec["a_shape"], spec["b_shape"]
        if kron_order(r, m1, n1, m2, n2) == "a_first":
            return {"kron_a": (m1, n1 * r), "kron_b": (m2 * r, n2)}
        return {"kron_b": (m2, n2 * r), "kron_a": (m1 * r, n1)}
    ones = (1,) * (lead - 1) if lead >= 1 else ()
    (kl, bl1, bl2), (kr, br1, br2) = spec["left"], spec["right"]
    return {"gs_left": (kl, *ones, bl1, bl2), "gs_right": (kr, *ones, br1, br2)}


def _lower_kron(e: _Emitter, x: ir.Value, spec: dict, lay: Mapping[str, np.ndarray | Deferred]) -> ir.Value:
    r = spec["rank"]
    (m1, n1), (m2, n2) = spec["a_shape"], spec["b_shape"]
    order = kron_order(r, m1, n1, m2, n2)
    if order == "b_first":  # mirror image: swap the roles of (a, m1, n1) and (b, m2, n2) below
        (p1, q1, first), (p2, q2, second) = (m2, n2, "kron_b"), (m1, n1, "kron_a")
    else:
        (p1, q1, first), (p2, q2, second) = (m1, n1, "kron_a"), (m2, n2, "kron_b")
    # a_first: x[.., m1, m2] -> [.., m2, m1] @ A[m1, (n1 r)] -> [.., n1, (m2 r)] @ B[(m2 r), n2] -> [.., n1, n2]
    # b_first: x[.., m1, m2] @ B[m2, (n2 r)] -> [.., n2, (m1 r)] @ A[(m1 r), n1] -> [.., n2, n1] -> [.., n1, n2]
    if order == "a_first" and m1 > 1 and m2 > 1:
        h = e.swap_last(e.reshape(x, [m1, m2], "shape_in"), 2, 0, 1)
    else:
        h = e.reshape(x, [p2, p1], "shape_in") if p2 > 1 else x
    h = e.op("MatMul", [h, e.weight(first, lay[first])])                    # [.., p2, q1*r]
    if q1 > 1 and p2 > 1:
        h = e.swap_last(e.reshape(h, [p2, q1, r], "shape_mid"), 3, 0, 1)    # [.., q1, p2, r]
    h = e.reshape(h, [q1, p2 * r] if q1 > 1 else [p2 * r], "shape_mid2")
    h = e.op("MatMul", [h, e.weight(second, lay[second])])                  # [.., q1, q2]
    if order == "b_first" and q1 > 1 and q2 > 1:
        h = e.swap_last(h, 2, 0, 1)                                          # [.., n1, n2]
    return e.reshape(h, [-1], "shape_out") if q1 > 1 else h


def gs_layouts(left: np.ndarray, right: np.ndarray, lead: int) -> dict[str, np.ndarray]:
    """Block factors with broadcast dims for [k, <lead dims>, rows, cols] MatMuls; when kr divides bl2
    the rows of R are reordered (c', l) -> (l, c') so the shuffle becomes a single transpose."""
    return {"gs_left": gs_left_layout(left, lead), "gs_right": gs_right_layout(right, left.shape[0], lead)}


def gs_left_layout(left: np.ndarray, lead: int) -> np.ndarray:
    """`gs_layouts`' left factor: the blocks with broadcast dims."""
    kl, bl1, bl2 = left.shape
    return left.reshape(kl, *((1,) * (lead - 1) if lead >= 1 else ()), bl1, bl2)


def gs_right_layout(right: np.ndarray, kl: int, lead: int) -> np.ndarray:
    """`gs_layouts`' right factor (``kl`` left blocks): rows reordered when kr divides bl2, then broadcast dims."""
    kr, br1, br2 = right.shape
    bl2 = kr * br1 // kl
    if bl2 % kr == 0:
        g = bl2 // kr   # R-block row j = c'*kl + l  ->  new row l*g + c'
        right = right.reshape(kr, g, kl, br2).transpose(0, 2, 1, 3).reshape(kr, br1, br2)
    return right.reshape(kr, *((1,) * (lead - 1) if lead >= 1 else ()), br1, br2)


def _lower_gs(e: _Emitter, x: ir.Value, spec: dict, lay: Mapping[str, np.ndarray | Deferred]) -> ir.Value:
    kl, bl1, bl2 = spec["left"]
    kr, br1, br2 = spec["right"]
    k = e.lead
    to_front = [k] + list(range(k)) + [k + 1]                   # [.., kb, n] -> [kb, .., n]
    h = e.op("Transpose", [e.reshape(x, [kl, bl1], "shape_in")], perm=to_front)
    h = e.op("MatMul", [h, e.weight("gs_left", lay["gs_left"])])               # [kl, .., bl2]
    if bl2 % kr == 0:   # [kl, .., kr, g] -> [kr, .., kl, g] -> [kr, .., br1]
        g = bl2 // kr
        h = e.op("Reshape", [h, e.const("shape_mid", np.array([0] * (k + 1) + [kr, g], dtype=np.int64))])
        perm = [k + 1] + list(range(1, k + 1)) + [0, k + 2]
        h = e.op("Transpose", [h], perm=perm)
        h = e.op("Reshape", [h, e.const("shape_mid2", np.array([0] * (k + 1) + [br1], dtype=np.int64))])
    else:               # general shuffle: [kl, .., bl2] -> [.., bl2, kl] -> [.., kr, br1] -> [kr, .., br1]
        h = e.op("Transpose", [h], perm=list(range(1, k + 2)) + [0])
        h = e.op("Transpose", [e.reshape(h, [kr, br1], "shape_mid")], perm=to_front)
    h = e.op("MatMul", [h, e.weight("gs_right", lay["gs_right"])])             # [kr, .., br2]
    h = e.op("Transpose", [h], perm=list(range(1, k + 1)) + [0, k + 1])        # [.., kr, br2]
    return e.reshape(h, [kr * br2], "shape_out")


def lower_gs_blocks(x: ir.Value, gs_left: np.ndarray, gs_right: np.ndarray, name: str,
                    ) -> tuple[list[ir.Node], list[ir.Value], ir.Value]:
    """GS x @ W with one 2-D MatMul per block: Split, MatMul per left block, Concat, the shuffle as one
    Transpose, Split, MatMul per right block, Concat.

    The batched form (``lower_structured``) is fewer nodes, but weight-only quantizers (ONNX Runtime's
    MatMulNBits) take 2-D constant weights only. ``gs_left``/``gs_right`` are the arrays of
    ``gs_layouts`` (broadcast dims allowed), so an already lowered graph can be re-lowered from its own
    initializers."""
    left = gs_left.reshape(gs_left.shape[0], *gs_left.shape[-2:])
    right = gs_right.reshape(gs_right.shape[0], *gs_right.shape[-2:])
    kl, bl1, bl2 = left.shape
    kr, br1, br2 = right.shape
    if x.shape is None or kl * bl2 != kr * br1:
        raise UserError(f"cannot lower {name} in blocks: unknown input rank or factors {left.shape} / {right.shape} "
                        "do not chain")
    dtype = x.dtype if x.dtype is not None else ir.DataType.FLOAT
    e = _Emitter(name, len(x.shape) - 1, dtype)
    mids = [e.op("MatMul", [part, e.weight(f"gs_left_{i}", left[i])])
            for i, part in enumerate(e.split(x, [bl1] * kl))]
    h = e.concat(mids)                                          # [.., (l, c)]
    if bl2 % kr == 0:   # rows of each right block were reordered to (l, c') by gs_layouts
        h = e.swap_last(e.reshape(h, [kl, kr, bl2 // kr], "shape_mid"), 3, 0, 1)   # [.., kr, kl, g]
    else:               # the perfect shuffle itself: (l, c) -> (c, l)
        h = e.swap_last(e.reshape(h, [kl, bl2], "shape_mid"), 2, 0, 1)             # [.., bl2, kl]
    h = e.reshape(h, [kl * bl2], "shape_mid2")
    outs = [e.op("MatMul", [part, e.weight(f"gs_right_{j}", right[j])])
            for j, part in enumerate(e.split(h, [br1] * kr))]
    y = e.concat(outs)
    y.shape = ir.Shape([*x.shape[:-1], kr * br2])
    return e.nodes, e.inits, y


def lower_structured(x: ir.Value, spec: Mapping, factors: Mapping[str, np.ndarray] | FactorLoader, name: str,
                     ) -> tuple[list[ir.Node], list[ir.Value], ir.Value]:
    """Nodes, initializers (to register on the graph) and output value computing x @ W.

    x must have a known rank (>= 2 is typical: [B, T, in]; [in] alone is accepted too) and last dim
    == spec["in"]. Factors use the names of `factors()` and are cast to x's dtype. A `FactorLoader` instead
    of arrays defers every weight to when the model is written (`Deferred`): the same bytes, read then.
    """
    s = validate_spec(spec)
    if x.shape is None:
        raise UserError(f"cannot lower {name}: input {x.name!r} has unknown rank; run shape inference first")
    last = x.shape[-1] if len(x.shape) else None
    if isinstance(last, int) and last != s["in"]:
        raise UserError(f"cannot lower {name}: input last dim {last} != spec in {s['in']}")
    for key, shape in ({} if callable(factors) else factor_shapes(s)).items():
        if key not in factors or tuple(np.shape(factors[key])) != shape:
            raise UserError(f"cannot lower {name}: factor {key!r} must have shape {shape}")
    dtype = x.dtype if x.dtype is not None else ir.DataType.FLOAT
    e = _Emitter(name, len(x.shape) - 1, dtype)
    lay = _layouts(s, e.lead, factors)
    if s["kind"] == "dense":
        y = e.op("MatMul", [x, e.weight("weight", lay["weight"])])
    elif s["kind"] == "kron":
        y = _lower_kron(e, x, s, lay)
    else:
        y = _lower_gs(e, x, s, lay)
    y.shape = ir.Shape([*x.shape[:-1], s["out"]])
    return e.nodes, e.inits, y


def standalone_model(spec: Mapping, factors: Mapping[str, np.ndarray], lead: int = 2,
                     dtype: ir.DataType = ir.DataType.FLOAT, name: str = "linear", opset: int = 18,
                     gs_blocks: bool = False) -> ir.Model:
    """A one-layer model y = x @ W (input "x" [d0.., in] with symbolic leading dims, output "y"),
    for tests and benchmarks of a lowering in isolation; ``gs_blocks`` uses ``lower_gs_blocks`` for GS."""
    dims = [f"d{i}" for i in range(lead)] + [int(spec["in"])]
    x = ir.Value(name="x", shape=ir.Shape(dims), type=ir.TensorType(dtype))
    if gs_blocks and spec["kind"] == "gs":
        lay = gs_layouts(np.asarray(factors["left"]), np.asarray(factors["right"]), 1)
        nodes, inits, y = lower_gs_blocks(x, lay["gs_left"].astype(dtype.numpy()), lay["gs_right"].astype(dtype.numpy()),
                                          name)
    else:
        nodes, inits, y = lower_structured(x, spec, factors, name)
    y.name = "y"
    graph = ir.Graph([x], [y], nodes=nodes, opset_imports={"": opset}, name=name.replace("/", "_"))
    for v in inits:
        graph.register_initializer(v)
    return ir.Model(graph, ir_version=10)
