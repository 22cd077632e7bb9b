"""The structured MatMul rewrite on exported tiny models: ORT matches the torch structured model,
no dense weight is left for rewritten modules, the bytes saved are exactly what the factor map promises,
and bad inputs are one-line UserErrors that leave nothing behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest

from procrustes_onnx.compiler.adapters import get_module
from procrustes_onnx.compiler.checkpoint import load_stand_ins
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.exporters import (RewriteStructuredMatmulsPass, promised_saving,
                                             rewrite_structured_matmuls)
from procrustes_onnx.exporters.inspect import inspect_onnx
from procrustes_onnx.exporters.onnx_export import MAP_FILE
from procrustes_onnx.exporters.pipeline import export_compressed
from test_export_helpers import (STRUCTURE, STRUCTURED_DIR, add_random_shortcuts, assert_decode_matches, exported,
                                 random_matrix)

ARCHS = ("llama", "qwen2", "opt")


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    """arch -> rewritten model.onnx (one rewrite per architecture)."""
    out = {}
    for arch in ARCHS:
        _, _, factor_map, path = exported(arch)
        out[arch] = rewrite_structured_matmuls(path.parent, tmp_path_factory.mktemp(arch) / "rw", factor_map=factor_map)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_rewritten_matches_structured_torch_with_cache(arch, rewritten):
    structured, _, _, _ = exported(arch)
    assert_decode_matches(structured, rewritten[arch], steps=4)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_dense_matmul_left_for_structured_modules(arch, rewritten):
    _, dense, factor_map, path = exported(arch)
    old_map = json.loads((path.parent / MAP_FILE).read_text())
    graph = ir.load(rewritten[arch]).graph
    names = {n.name for n in graph}
    for module, entry in factor_map.items():
        assert old_map[module]["node"] not in names
        if not old_map[module]["weight"].startswith("lm_head"):
            assert old_map[module]["weight"] not in graph.initializers
        ops = [n for n in graph if n.name.startswith(f"{module}/")]
        matmuls = [n for n in ops if n.op_type == "MatMul"]
        assert len(matmuls) == 2  # two GEMMs per Kronecker sum or GS matrix
        consts = [v.const_value.size for n in matmuls for v in n.inputs if v.is_initializer()]
        assert sorted(consts) == sorted(f.numel() for f in entry["factors"].values())
    dense_sizes = {e["spec"]["in"] * e["spec"]["out"] for e in factor_map.values()}
    for node in graph:  # every remaining MatMul/Gemm by a constant is a module the factor map keeps dense
        if node.op_type in ("MatMul", "Gemm") and node.inputs[1].is_initializer() and node.name.startswith("/"):
            assert node.name.split("/")[1] not in factor_map


@pytest.mark.parametrize("arch", ARCHS)
def test_bytes_saved_match_factor_map(arch, rewritten):
    _, _, factor_map, _ = exported(arch)
    report = json.loads((rewritten[arch].parent / "rewrite.json").read_text())
    promised = promised_saving(factor_map)
    assert promised == report["promised_saving_bytes"] > 0
    assert report["weight_bytes_before"] - report["weight_bytes_after"] == promised  # exact, float weights
    shrink = report["file_bytes_before"] - report["file_bytes_after"]
    assert abs(shrink - promised) <= 4096  # graph nodes and int64 shape constants added by the lowering


def test_side_files_and_map_updated(rewritten):
    folder = rewritten["llama"].parent
    for name in ("config.json", "generation_config.json", "export.json", "rewrite.json", "model.onnx.data"):
        assert (folder / name).is_file()
    new_map = json.loads((folder / MAP_FILE).read_text())
    assert new_map["model.layers.0.self_attn.q_proj"]["structured"]["kind"] == "kron"
    assert new_map["model.layers.0.self_attn.q_proj"]["node"] is None
    assert "structured" not in new_map["model.layers.0.self_attn.v_proj"]


def test_empty_factor_map_is_not_modified():
    _, _, _, path = exported("llama")
    model = ir.load(path)
    before = [n.name for n in model.graph]
    result = RewriteStructuredMatmulsPass(json.loads((path.parent / MAP_FILE).read_text()), {})(model)
    assert result.modified is False
    assert [n.name for n in model.graph] == before


def _factor_map(arch="llama"):
    _, _, factor_map, path = exported(arch)
    return {k: {"spec": dict(v["spec"]), "factors": dict(v["factors"])} for k, v in factor_map.items()}, path


def _assert_user_error(tmp_path, match, src=None, **kw):
    factor_map, path = _factor_map()
    kw.setdefault("factor_map", factor_map)
    out = kw.pop("out", tmp_path / "out")
    with pytest.raises(UserError, match=match) as info:
        rewrite_structured_matmuls(src or path.parent, out, **kw)
    assert "\n" not in str(info.value)
    assert not out.exists() or out == path.parent or out.is_relative_to(path.parent)
    return info


def test_corrupt_onnx_file(tmp_path):
    _, path = _factor_map()
    bad = tmp_path / "bad"
    shutil.copytree(path.parent, bad)
    (bad / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    _assert_user_error(tmp_path, "not a readable ONNX", src=bad)


def test_foreign_onnx_without_map(tmp_path):
    _, path = _factor_map()
    foreign = tmp_path / "foreign"
    shutil.copytree(path.parent, foreign)
    (foreign / MAP_FILE).unlink()
    _assert_user_error(tmp_path, "no matmul_map.json", src=foreign)


def test_factor_map_module_missing_from_map(tmp_path):
    factor_map, _ = _factor_map()
    factor_map["model.layers.9.mlp.up_proj"] = next(iter(factor_map.values()))
    _assert_user_error(tmp_path, "not in matmul_map", factor_map=factor_map)


def test_factor_map_shape_mismatch(tmp_path):
    factor_map, _ = _factor_map()
    factor_map["model.layers.1.self_attn.k_proj"] = factor_map["model.layers.0.self_attn.q_proj"]  # 64x64 vs 64x32
    _assert_user_error(tmp_path, "factor map's spec", factor_map=factor_map)


def test_factor_map_dtype_mismatch(tmp_path):
    factor_map, _ = _factor_map()
    entry = factor_map["model.layers.0.self_attn.q_proj"]
    entry["factors"] = {k: v.double() for k, v in entry["factors"].items()}
    _assert_user_error(tmp_path, "float64", factor_map=factor_map)


def test_missing_initializer(tmp_path):
    factor_map, path = _factor_map()
    broken = tmp_path / "broken"
    shutil.copytree(path.parent, broken)
    mp = json.loads((broken / MAP_FILE).read_text())
    mp["model.layers.0.self_attn.q_proj"]["weight"] = "no_such_weight"
    (broken / MAP_FILE).write_text(json.dumps(mp))
    _assert_user_error(tmp_path, "missing from the ONNX file", src=broken)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_overlapping_input(tmp_path, where):
    _, path = _factor_map()
    out = path.parent if where == "same" else path.parent / "rw"
    files = sorted(p.name for p in path.parent.iterdir())
    _assert_user_error(tmp_path, "inputs are never modified", out=out)
    assert sorted(p.name for p in path.parent.iterdir()) == files


def test_compressed_checkpoint_with_skips_exports_structured_and_matches():
    """export_compressed (checkpoint -> dense twin -> rewrite) on a checkpoint with skip matrices."""
    structured, _, factor_map, path = exported("llama")
    out = path.parent.parent / STRUCTURED_DIR / "model.onnx"
    info = inspect_onnx(out)
    assert info["matmuls"]["structured_modules"] == len(factor_map)
    assert info["matmuls"]["structured_gemms"] == 2 * len(factor_map)
    assert_decode_matches(structured, out, steps=2, seed=5)


def test_export_without_a_kept_twin_traces_stand_ins_and_writes_the_same_model(tmp_path):
    """Not keeping the dense twin, export traces broadcast stand-ins (no memory: stride 0) instead of dense
    weights; after the rewrite the structured model is the one the kept-twin route writes, tensor for tensor."""
    structured, _, _, path = exported("llama")
    stand = load_stand_ins(path.parent.parent / "ckpt")
    model, factor_map, skips = stand.model, stand.factor_map, stand.skips
    weights = [get_module(model, name).weight for name in [*factor_map, *skips]] + [model.model.embed_tokens.weight]
    assert factor_map and skips and stand.tables and all(w.stride() == (0, 0) for w in weights)
    assert len({float(w[0, 0]) for w in weights}) == len(weights)  # distinct: no two may be deduplicated
    assert all(callable(entry["factors"]) for entry in factor_map.values())  # read when written, not held
    lean = ir.load(export_compressed(path.parent.parent / "ckpt", tmp_path / "lean"))
    kept = ir.load(path.parent.parent / STRUCTURED_DIR / "model.onnx")
    assert [n.op_type for n in lean.graph] == [n.op_type for n in kept.graph]
    assert sorted(lean.graph.initializers) == sorted(kept.graph.initializers)
    for name, v in kept.graph.initializers.items():
        assert np.array_equal(lean.graph.initializers[name].const_value.numpy(), v.const_value.numpy()), name
    assert not list(tmp_path.glob(".dense-*"))  # the scratch twin is gone


def test_export_of_an_untied_model_without_a_kept_twin_defers_the_head_too(tmp_path):
    """An untied head is a table of its own (a stand-in found again by its value): the result is still the kept-twin
    route's model, initializer for initializer."""
    import torch

    from procrustes_onnx.compiler.checkpoint import save_compressed
    from procrustes_onnx.ops import StructuredLinear
    from procrustes_onnx.testing import tiny_model

    model = tiny_model("llama", tie=False, seed=3)
    gen = torch.Generator().manual_seed(3)
    for name, (kind, *shapes) in STRUCTURE["llama"].items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, StructuredLinear(random_matrix(kind, *shapes, gen=gen)))
    add_random_shortcuts(model)
    save_compressed(model, tmp_path / "ck")
    stand = load_stand_ins(tmp_path / "ck")  # the embedding, the head and the linears left dense are tables
    assert stand.model.lm_head.weight.stride() == stand.model.model.embed_tokens.weight.stride() == (0, 0)
    assert stand.model.lm_head.weight is not stand.model.model.embed_tokens.weight
    lean = ir.load(export_compressed(tmp_path / "ck", tmp_path / "lean"))
    kept = ir.load(export_compressed(tmp_path / "ck", tmp_path / "kept", dense_dir=tmp_path / "twin"))
    assert sorted(lean.graph.initializers) == sorted(kept.graph.initializers)
    for name, v in kept.graph.initializers.items():
        assert np.array_equal(lean.graph.initializers[name].const_value.numpy(), v.const_value.numpy()), name
