"""Export of tiny HF models with and without KV cache: ORT matches torch, the MatMul map is exact.

The models are tiny_model's with a few layers set from random structured factors (the dense twin of
test_export_helpers.structured_tiny), so the rewrite tests reuse the same exports.
Relative error is max|ort - torch| / max|torch| over a logits tensor; float32 tolerance 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from procrustes_onnx.compiler.skips import Shortcut
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.exporters.onnx_export import MAP_FILE, export_onnx
from test_export_helpers import RTOL, assert_decode_matches, exported, rel_err

ARCHS = ("llama", "qwen2", "opt")


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_export_prefill_and_decode_match_torch(arch):
    _, model, _, path = exported(arch)
    assert_decode_matches(model, path)


@pytest.mark.parametrize("arch", ARCHS)
def test_matmul_map_points_at_each_linear_weight(arch):
    _, model, _, path = exported(arch)
    mapping = json.loads((path.parent / MAP_FILE).read_text())
    graph = ir.load(path).graph
    nodes = {n.name: n for n in graph}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    skips = {n: m for n, m in model.named_modules() if isinstance(m, Shortcut)}
    assert bool(skips) == (arch == "llama")  # llama carries per-position skip matrices
    assert set(mapping) == set(linears) | set(skips)
    for name, entry in mapping.items():
        node = nodes[entry["node"]]
        assert node.op_type == entry["op"]
        stored = graph.initializers[entry["weight"]].const_value.numpy()
        if name in skips:  # y = x @ weight: stored as is, MatMul layout
            np.testing.assert_array_equal(stored, skips[name].weight.detach().numpy())
            continue
        weight = linears[name].weight.detach().numpy()
        np.testing.assert_array_equal(stored, weight.T if entry["transposed"] else weight)
        assert entry["shape"] == [linears[name].in_features, linears[name].out_features]


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_embedding_stored_once(arch):
    _, model, _, path = exported(arch)
    emb = model.get_input_embeddings().weight.detach().numpy()
    graph = ir.load(path).graph
    copies = [v.name for v in graph.initializers.values()
              if v.const_value.size == emb.size and (np.array_equal(v.const_value.numpy(), emb)
                                                   or np.array_equal(v.const_value.numpy(), emb.T))]
    assert len(copies) == 1
    n_params = sum(p.numel() for p in model.parameters())  # parameters() yields the tied tensor once
    data_bytes = (path.parent / "model.onnx.data").stat().st_size
    config = model.config
    head = config.hidden_size // config.num_attention_heads
    rotary = 4 * config.max_position_embeddings * head if arch != "opt" else 0  # fused GQA's cos/sin caches
    assert data_bytes <= 4 * n_params + rotary + 4096  # only small constants (rotary, shapes) on top


def test_io_names_follow_optimum():
    _, model, _, path = exported("llama")
    sess = ort.InferenceSession(str(path))
    layers = model.config.num_hidden_layers
    kv = [f"{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "position_ids"] + \
        [f"past_key_values.{n}" for n in kv]
    assert [o.name for o in sess.get_outputs()] == ["logits"] + [f"present.{n}" for n in kv]
    for name in ("config.json", "generation_config.json", "export.json"):
        assert (path.parent / name).is_file()


def test_logits_only_export_matches_torch():
    _, model, _, path = exported("opt", with_past=False)
    sess = ort.InferenceSession(str(path))
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    torch.manual_seed(3)
    for batch, seq in ((1, 7), (3, 2)):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq))
        with torch.no_grad():
            ref = model(input_ids=ids).logits.numpy()
        got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, seq), np.int64),
                              "position_ids": np.tile(np.arange(seq), (batch, 1))})[0]
        assert rel_err(got, ref) < RTOL
        assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def test_non_hf_model_is_a_user_error_and_writes_nothing(tmp_path):
    with pytest.raises(UserError, match="causal LM"):
        export_onnx(torch.nn.Linear(4, 4), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
