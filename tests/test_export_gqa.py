"""`--attention gqa`: each layer's attention core as one com.microsoft GroupQueryAttention node.

The fused graph must compute what the unfused export and torch compute: logits and present KV within
rel 1e-4 (fp32) for prefills (batch 1 and 2, with and without a past) and single-token decode steps; the
structured rewrite and int4 quantization still apply to it. Relative error is max|a - b| / max|b|.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.graph_io import ATTENTION_KEY
from procrustes_onnx.exporters.onnx_export import MAP_FILE, export_onnx
from procrustes_onnx.exporters.pipeline import export_compressed
from procrustes_onnx.exporters.quantize import QuantizeConfig, quantize_artifact
from procrustes_onnx.runtime.generate import SamplingConfig, generate_ids
from procrustes_onnx.runtime.session import OnnxCausalLM
from procrustes_onnx.testing import tiny_model
from test_export_helpers import RTOL, assert_decode_matches, exported, kv_geometry, rel_err

ARCHS = ("llama", "qwen2")  # qwen2: q/k/v biases


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """arch -> (tiny model, unfused model.onnx, gqa model.onnx), exported once per module."""
    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(f"gqa-{arch}")
        model = tiny_model(arch).eval()
        out[arch] = (model, export_onnx(model, root / "unfused", attention="unfused"),
                     export_onnx(model, root / "gqa", attention="gqa"))
    return out


def _feeds(config, batch: int, seq: int, past: int, seed: int) -> dict[str, np.ndarray]:
    layers, kv, hd = kv_geometry(config)
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, config.vocab_size, (batch, seq)),
             "attention_mask": np.ones((batch, past + seq), np.int64),
             "position_ids": np.tile(np.arange(past, past + seq), (batch, 1))}
    for i in range(layers):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = rng.standard_normal((batch, kv, past, hd)).astype(np.float32)
    return feeds


def test_one_gqa_node_per_layer_and_projections_stay_mapped(pair):
    model, unfused, fused = pair["llama"]
    ops = [n.op_type for n in ir.load(fused).graph]
    layers = model.config.num_hidden_layers
    assert ops.count("GroupQueryAttention") == layers
    assert not {"Softmax", "Where", "Concat"} & set(ops)  # no exporter attention or cache plumbing
    assert ops.count("Expand") == 1  # query_seqlens, once per step
    assert len(ops) < len(list(ir.load(unfused).graph)) / 2
    maps = [json.loads((p.parent / MAP_FILE).read_text()) for p in (unfused, fused)]
    assert sorted(maps[0]) == sorted(maps[1])  # every q/k/v/o (and MLP, head) MatMul still found by name scope
    assert ir.load(fused).metadata_props[ATTENTION_KEY] == "gqa"
    assert json.loads((fused.parent / "export.json").read_text())["attention"] == "gqa"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch,seq,past", [(1, 7, 0), (2, 7, 0), (1, 3, 5), (2, 3, 5), (1, 1, 6), (2, 1, 9)])
def test_fused_logits_and_presents_match_unfused(pair, arch, batch, seq, past):
    """Prefills (empty past and a past of 5) and single-token decode steps: every output within RTOL."""
    model, unfused, fused = pair[arch]
    feeds = _feeds(model.config, batch, seq, past, seed=batch * 100 + seq * 10 + past)
    ref = ort.InferenceSession(str(unfused)).run(None, feeds)
    got = ort.InferenceSession(str(fused)).run(None, feeds)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert rel_err(g, r) < RTOL


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_greedy_decode_matches_torch(pair, arch):
    model, _, fused = pair[arch]
    assert_decode_matches(model, fused, steps=4)


def test_structured_rewrite_of_a_fused_export_matches_torch(tmp_path):
    """The compressed-checkpoint route (skip matrices, Kronecker and GS factors) with fused attention."""
    structured, _, _, dense_path = exported("llama")
    out = export_compressed(dense_path.parent.parent / "ckpt", tmp_path / "new" / "structured",  # parent made too
                            attention="gqa")
    ops = [n.op_type for n in ir.load(out).graph]
    assert ops.count("GroupQueryAttention") == structured.config.num_hidden_layers
    assert json.loads((out.parent / "rewrite.json").read_text())  # the rewrite ran on the fused twin
    assert_decode_matches(structured, out)


def test_int4_of_a_fused_graph_loads_and_generates(pair, tmp_path):
    model, unfused, fused = pair["llama"]
    out = quantize_artifact(fused.parent, tmp_path / "int4", QuantizeConfig(bits=4, block_size=16))
    ops = {n.op_type for n in ir.load(out).graph}
    assert {"GroupQueryAttention", "MatMulNBits"} <= ops
    lm, ref = OnnxCausalLM(out.parent, threads=1), OnnxCausalLM(fused.parent, threads=1)
    assert lm.attention == "gqa"
    ids = generate_ids(lm, [3, 14, 15, 92, 65], SamplingConfig(max_new_tokens=8)).token_ids
    assert len(ids) == 8
    prompt = np.array([[3, 14, 15, 92, 65, 35, 89, 79]])
    assert rel_err(lm.logits(prompt), ref.logits(prompt)) < 0.2  # int4 of a random tiny model: loose, but close


def test_left_padded_batch_is_refused_by_the_runtime(pair):
    _, _, fused = pair["llama"]
    lm = OnnxCausalLM(fused.parent, threads=1)
    lm.prefill(np.array([[5, 6, 7], [8, 9, 10]]))  # unpadded batches run
    with pytest.raises(UserError, match="GroupQueryAttention.*--attention unfused"):
        lm.prefill(np.array([[0, 6, 7], [8, 9, 10]]), attention_mask=np.array([[0, 1, 1], [1, 1, 1]]))


def test_unfusable_attention_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--attention gqa: cannot fuse OPTForCausalLM.*--attention unfused"):
        export_onnx(tiny_model("opt"), tmp_path / "opt", attention="gqa")
    with pytest.raises(UserError, match="--attention must be one of"):
        export_onnx(tiny_model("llama"), tmp_path / "x", attention="mha")
    assert not (tmp_path / "opt").exists()


def test_onnxruntime_genai_runs_the_fused_graph_with_a_shared_buffer(tmp_path):
    """genai_config.json says past_present_share_buffer: genai's greedy ids equal ours over 30 tokens."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install '.[genai]')")
    fused = export_onnx(tiny_model("llama", tie=False), tmp_path / "gqa", attention="gqa")  # untied: no repeats
    assert json.loads((fused.parent / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    lm, og_model = OnnxCausalLM(fused.parent, threads=1), og.Model(str(fused.parent))
    prompt = [3, 14, 15, 92, 65, 35]
    ours = generate_ids(lm, prompt, SamplingConfig(max_new_tokens=30), eos_ids=[-1]).token_ids
    params = og.GeneratorParams(og_model)
    params.set_search_options(do_sample=False, max_length=64)  # a buffer longer than the sequence
    gen = og.Generator(og_model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    theirs = []
    while len(theirs) < 30:
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    assert theirs == ours
    assert len(set(ours)) > 2


def _rope_model(rope: dict) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from procrustes_onnx.testing import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.rope_parameters = {"rope_theta": 10000.0, **rope}
    return AutoModelForCausalLM.from_config(config).eval()


def test_scaled_rope_fuses_exactly_and_dynamic_rope_stays_unfused(tmp_path):
    """llama3-scaled RoPE is fixed at load (one cos/sin cache, exact); dynamic RoPE changes with the
    length, so "auto" keeps it unfused (which the exporter cannot trace either) and "gqa" refuses it."""
    model = _rope_model({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})
    unfused = export_onnx(model, tmp_path / "u", attention="unfused")
    fused = export_onnx(model, tmp_path / "f", attention="gqa")
    feeds = _feeds(model.config, 2, 3, 70, seed=7)  # positions past the original 64
    got = ort.InferenceSession(str(fused)).run(None, feeds)
    for g, r in zip(got, ort.InferenceSession(str(unfused)).run(None, feeds)):
        assert rel_err(g, r) < RTOL
    dynamic = _rope_model({"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UserError, match="RoPE \\(dynamic\\) changes with the sequence length"):
        export_onnx(dynamic, tmp_path / "d", attention="gqa")
    from procrustes_onnx.exporters.gqa import resolve_attention

    assert resolve_attention(dynamic, "auto", with_past=True) == "unfused"
