"""Weight-only int4/int8 artifacts (exporters/quantize.py) on tiny exported models: the GS re-lowering is
exact, the quantized folders load and generate in ONNX Runtime, their logits are close to fp32 in the
order the precision promises, the report lists what stayed float and why, and the input is untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.outputs import read_identity
from procrustes_onnx.exporters.pipeline import ort_logits
from procrustes_onnx.exporters.quantize import QUANT_FILE, QuantizeConfig, quantize_artifact, relower_gs_blocks
from procrustes_onnx.runtime.generate import SamplingConfig, generate_ids
from procrustes_onnx.runtime.session import OnnxCausalLM
from test_export_helpers import STRUCTURED_DIR, exported, rel_err
from test_runtime_helpers import tiny_artifact


@pytest.fixture(scope="module")
def structured() -> Path:
    """The tiny Llama's structured artifact (Kronecker and GS modules, skip matrices)."""
    *_, path = exported("llama")
    return path.parent.parent / STRUCTURED_DIR


def _hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def _ids(vocab: int, n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(1, n)).astype(np.int64)


def test_gs_blocks_relowering_is_exact(structured, tmp_path):
    model = ir.load(structured / "model.onnx")
    gs = [n for n in model.graph.initializers if n.endswith("/gs_left")]
    assert gs, "the fixture has no GS module"
    done = relower_gs_blocks(model)
    assert sorted(done) == sorted(n[: -len("/gs_left")] for n in gs)
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[1].const_value is not None:
            assert len(node.inputs[1].shape) == 2, node.name      # what MatMulNBits can take
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data")
    ids = _ids(256)
    assert rel_err(ort_logits(tmp_path / "model.onnx", ids), ort_logits(structured / "model.onnx", ids)) < 1e-5


@pytest.mark.parametrize("bits", [8, 4])
def test_structured_artifact_quantizes_loads_and_generates(structured, tmp_path, bits):
    before = _hashes(structured)
    out = quantize_artifact(structured, tmp_path / f"int{bits}", QuantizeConfig(bits=bits, block_size=16))
    assert _hashes(structured) == before, "the input changed"
    report = json.loads((out.parent / QUANT_FILE).read_text())
    assert report["quantized_ops"]["MatMulNBits"] > 0 and report["gs_relowered_in_blocks"] > 0
    assert report["bytes_after"] < report["bytes_before"]
    assert all(k["why"] for k in report["kept_float"])
    assert read_identity(out.parent)["quantized"] == f"int{bits}"
    ids = _ids(256)
    err = rel_err(ort_logits(out, ids), ort_logits(structured / "model.onnx", ids))
    assert err < (0.04 if bits == 8 else 0.4), err
    greedy = generate_ids(OnnxCausalLM(out, threads=1), [1, 2, 3], SamplingConfig(max_new_tokens=4)).token_ids
    assert len(greedy) == 4 and all(0 <= t < 256 for t in greedy)


def test_int8_is_closer_than_int4_and_both_shrink_the_dense_file(tmp_path):
    tiny = tiny_artifact()
    ids = _ids(256, 16, seed=3)
    ref = ort_logits(tiny.onnx, ids)
    errors, sizes = {}, {}
    for bits in (8, 4):
        out = quantize_artifact(tiny.dir, tmp_path / f"int{bits}", QuantizeConfig(bits=bits, block_size=16))
        errors[bits] = rel_err(ort_logits(out, ids), ref)
        sizes[bits] = json.loads((out.parent / QUANT_FILE).read_text())["bytes_after"]
    assert errors[8] < errors[4] / 4
    assert sizes[4] < sizes[8] < json.loads((out.parent / QUANT_FILE).read_text())["bytes_before"]


def test_head_precision_and_kept_reasons(tmp_path):
    tiny = tiny_artifact()
    out = quantize_artifact(tiny.dir, tmp_path / "q", QuantizeConfig(bits=4, head_bits=8, block_size=128))
    report = json.loads((out.parent / QUANT_FILE).read_text())
    assert report["label"] == "int4 (head int8)"
    # hidden 64 < block 128: every layer matrix stays float, with the reason; the head (K=64) too
    assert report["kept_float"] and all("below the block size 128" in k["why"] for k in report["kept_float"])


def test_keep_regex_leaves_matching_nodes_float(tmp_path):
    tiny = tiny_artifact()
    out = quantize_artifact(tiny.dir, tmp_path / "q", QuantizeConfig(block_size=16, keep="mlp"))
    report = json.loads((out.parent / QUANT_FILE).read_text())
    kept = [k for k in report["kept_float"] if "--quantize-keep" in k["why"]]
    assert kept and all("mlp" in k["node"] for k in kept)
    with pytest.raises(UserError, match="not a regular expression"):
        QuantizeConfig(keep="(").validate()


def test_refuses_non_artifacts_and_quantized_inputs(tmp_path):
    tiny = tiny_artifact()
    with pytest.raises(UserError, match="has no model.onnx"):
        quantize_artifact(tmp_path, tmp_path / "q")
    q = quantize_artifact(tiny.dir, tmp_path / "q4").parent
    with pytest.raises(UserError, match="is already int4"):
        quantize_artifact(q, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    with pytest.raises(UserError, match="power of two"):
        QuantizeConfig(block_size=48).validate()
    with pytest.raises(UserError, match="int3|not supported"):
        QuantizeConfig(bits=3).validate()


def test_fused_artifact_matches_unfused_and_quantizes(structured, tmp_path):
    from procrustes_onnx.exporters.fuse import FUSE_FILE, fuse_artifact

    tiny = tiny_artifact()
    for src in (tiny.dir, structured):
        out = fuse_artifact(src, tmp_path / f"fused-{src.name}")
        report = json.loads((out.parent / FUSE_FILE).read_text())
        assert report["logits_rel_error"] < 1e-4
        ids = _ids(256, 10, seed=1)
        assert rel_err(ort_logits(out, ids), ort_logits(src / "model.onnx", ids)) < 1e-4
    assert report["fusions"], "nothing fused in the structured artifact"
    q = quantize_artifact(out.parent, tmp_path / "fused-int4", QuantizeConfig(block_size=16))
    assert read_identity(q.parent)["fused"] and read_identity(q.parent)["quantized"] == "int4"


@pytest.mark.parametrize("bits", [4, 8])
def test_tied_table_is_stored_once_and_logits_do_not_move(tmp_path, bits):
    tiny = tiny_artifact()  # tied embeddings
    ids = _ids(256, 10, seed=2)
    outs = {share: quantize_artifact(tiny.dir, tmp_path / f"{share}", QuantizeConfig(bits=bits, block_size=16,
                                                                                       share_table=share))
            for share in (True, False)}
    reports = {k: json.loads((v.parent / QUANT_FILE).read_text()) for k, v in outs.items()}
    assert reports[True]["token_table_shared_with_head"] and not reports[False]["token_table_shared_with_head"]
    table_bytes = 257 * 64 * bits // 8
    assert reports[False]["bytes_after"] - reports[True]["bytes_after"] >= 0.9 * table_bytes
    shared, separate = ort_logits(outs[True], ids), ort_logits(outs[False], ids)
    if bits == 4:  # the same blocks, byte for byte
        np.testing.assert_array_equal(shared, separate)
    else:          # the head's rounding of the table instead of the Gather's own: within int8 noise
        assert rel_err(shared, separate) < 0.01


def test_packed_siblings_quantize_to_the_same_numbers_in_fewer_nodes(tmp_path):
    """q/k/v (into GroupQueryAttention's packed input) and gate/up packed into one MatMul each: the fp32 graph
    computes the same logits bit for bit, and so does the int4 one (each column's blocks round alone)."""
    from procrustes_onnx.core.artifacts import load_onnx
    from procrustes_onnx.exporters.pack import pack_sibling_matmuls

    tiny = tiny_artifact()
    ids = _ids(256, 12, seed=4)
    model = load_onnx(tiny.onnx)
    before = sum(n.op_type == "MatMul" for n in model.graph)
    packs = pack_sibling_matmuls(model)
    layers = json.loads((tiny.dir / "config.json").read_text())["num_hidden_layers"]
    assert sorted(p["cut"] for p in packs) == ["GroupQueryAttention packed QKV"] * layers + ["Split"] * layers
    assert sum(n.op_type == "MatMul" for n in model.graph) == before - 3 * layers
    assert not [v for v in model.graph.initializers if v.endswith(("q_proj.weight_t", "up_proj.weight_t"))]
    (tmp_path / "fp32").mkdir()
    ir.save(model, tmp_path / "fp32" / "model.onnx", external_data="model.onnx.data")
    assert np.array_equal(ort_logits(tmp_path / "fp32" / "model.onnx", ids), ort_logits(tiny.onnx, ids))

    logits, nbits = {}, {}
    for pack in (False, True):
        out = quantize_artifact(tiny.dir, tmp_path / f"int4-{pack}", QuantizeConfig(block_size=16, min_elements=0, pack=pack))
        report = json.loads((out.parent / QUANT_FILE).read_text())
        logits[pack], nbits[pack] = ort_logits(out, ids), report["quantized_ops"]["MatMulNBits"]
        assert len(report["packed"]) == (2 * layers if pack else 0)
    assert np.array_equal(logits[True], logits[False])
    assert nbits[True] == nbits[False] - 3 * layers


def test_packing_a_structured_artifact_changes_no_logit(structured, tmp_path):
    """Kronecker first factors and dense linears of one activation pack too; the logits stay the same."""
    ids = _ids(256, 10, seed=5)
    logits, packed = {}, {}
    for pack in (False, True):
        out = quantize_artifact(structured, tmp_path / f"int4-{pack}", QuantizeConfig(block_size=16, min_elements=0, pack=pack))
        logits[pack] = ort_logits(out, ids)
        packed[pack] = json.loads((out.parent / QUANT_FILE).read_text())["packed"]
    assert packed[True] and not packed[False]
    assert np.array_equal(logits[True], logits[False])
