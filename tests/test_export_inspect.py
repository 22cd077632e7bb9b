"""inspect_onnx on an exported and a rewritten tiny model: counts that follow from the factor map."""

from __future__ import annotations

import json

import pytest

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.exporters import rewrite_structured_matmuls
from procrustes_onnx.exporters.inspect import format_inspection, inspect_onnx
from test_export_helpers import exported


def test_inspect_dense_vs_rewritten(tmp_path):
    _, dense, factor_map, path = exported("qwen2")
    before = inspect_onnx(path.parent)
    out = rewrite_structured_matmuls(path, tmp_path / "rw", factor_map=factor_map)
    after = inspect_onnx(out)
    n = len(factor_map)
    assert before["matmuls"]["structured_modules"] == 0
    assert after["matmuls"]["structured_modules"] == n
    assert after["matmuls"]["structured_gemms"] == 2 * n
    assert after["matmuls"]["dense_by_constant"] == before["matmuls"]["dense_by_constant"] - n
    assert after["matmuls"]["activation_by_activation"] == before["matmuls"]["activation_by_activation"]
    factors = sum(f.numel() for e in factor_map.values() for f in e["factors"].values())
    dense_removed = sum(e["spec"]["in"] * e["spec"]["out"] for e in factor_map.values())
    kinds_b, kinds_a = before["parameters_by_kind"], after["parameters_by_kind"]
    assert kinds_a["structured_factors"] == factors
    assert kinds_b["dense_matmul"] - kinds_a["dense_matmul"] == dense_removed
    assert kinds_a["embedding"] == kinds_b["embedding"] == dense.config.vocab_size * dense.config.hidden_size
    assert after["total_bytes"] == sum(p.stat().st_size for p in out.parent.glob("model.onnx*"))
    report = json.loads((out.parent / "rewrite.json").read_text())
    assert after["total_bytes"] == report["file_bytes_after"]
    assert "structured_factors" in format_inspection(after)


def test_inspect_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        inspect_onnx(tmp_path / "nothing")
    (tmp_path / "model.onnx").write_bytes(b"not onnx at all")
    with pytest.raises(UserError, match="not a readable ONNX"):
        inspect_onnx(tmp_path)
