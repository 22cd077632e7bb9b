"""Summarize an exported (or rewritten) ONNX folder: op counts, parameters by kind, bytes on disk,
structured vs dense MatMuls. Reads initializer shapes only; external data is never loaded."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import onnx_ir as ir

from procrustes_onnx.core.artifacts import load_onnx, model_file, onnx_files

from .onnx_export import MAP_FILE

__all__ = ["inspect_onnx", "format_inspection"]

_WEIGHT_OPS = ("MatMul", "Gemm")


def _kind(value: ir.Value, structured: set[str]) -> str:
    """Role of an initializer, from its consumers (names are not trusted: the exporter anonymizes them)."""
    if not value.dtype.is_floating_point():
        return "constants"
    if any(value.name.startswith(f"{m}/") for m in structured):
        return "structured_factors"
    uses = [u.node for u in value.uses()]
    ops = {n.op_type for n in uses}
    if "Gather" in ops:
        return "embedding"
    if len(value.shape) == 2 and (ops & set(_WEIGHT_OPS) or any(
            n.op_type == "Transpose" and any(u.node.op_type in _WEIGHT_OPS for u in n.outputs[0].uses())
            for n in uses)):
        return "dense_matmul"
    if len(value.shape) == 1:
        return "vectors"  # norm scales, biases
    return "other"


def inspect_onnx(path: str | os.PathLike) -> dict[str, Any]:
    """Statistics of ``path`` (an artifact folder or a model.onnx); ``matmul_map.json`` next to it, when
    present, tells which modules are structured."""
    src = model_file(path)
    model = load_onnx(src)
    graph = model.graph
    map_path = src.parent / MAP_FILE
    mapping = json.loads(map_path.read_text()) if map_path.is_file() else {}
    structured = {m for m, e in mapping.items() if e.get("structured")}
    params: Counter[str] = Counter()
    for v in graph.initializers.values():
        params[_kind(v, structured)] += int(v.const_value.size) if v.const_value is not None else 0
    ops = Counter(n.op_type for n in graph)
    by_constant = [n for n in graph if n.op_type in _WEIGHT_OPS and n.inputs[1] is not None
                   and (n.inputs[1].is_initializer() or (n.inputs[1].producer() is not None
                                                          and n.inputs[1].producer().op_type == "Transpose"
                                                          and n.inputs[1].producer().inputs[0].is_initializer()))]
    structured_nodes = [n for n in by_constant if any((n.name or "").startswith(f"{m}/") for m in structured)]
    files = onnx_files(src)
    return {
        "path": str(src),
        "opset": graph.opset_imports.get("", None),
        "inputs": [v.name for v in graph.inputs],
        "outputs": [v.name for v in graph.outputs],
        "nodes": sum(ops.values()),
        "op_counts": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters_by_kind": dict(sorted(params.items())),
        "parameters": sum(v for k, v in params.items() if k != "constants"),
        "bytes_on_disk": files,
        "total_bytes": sum(files.values()),
        "matmuls": {
            "structured_modules": len(structured),
            "dense_modules": len(mapping) - len(structured),
            "structured_gemms": len(structured_nodes),
            "dense_by_constant": len(by_constant) - len(structured_nodes),
            "activation_by_activation": ops.get("MatMul", 0) + ops.get("Gemm", 0) - len(by_constant),
        },
    }


def format_inspection(info: dict[str, Any]) -> str:
    """A plain-text report for the CLI (the dict itself is the --json output)."""
    lines = [f"{info['path']}  opset {info['opset']}  {info['nodes']} nodes  {info['total_bytes']:,} bytes"]
    lines += [f"  file {name}: {size:,} bytes" for name, size in info["bytes_on_disk"].items()]
    lines += [f"  params {kind}: {n:,}" for kind, n in info["parameters_by_kind"].items()]
    lines += [f"  matmuls {kind}: {n}" for kind, n in info["matmuls"].items()]
    lines += ["  ops " + ", ".join(f"{op} {n}" for op, n in info["op_counts"].items())]
    return "\n".join(lines)
