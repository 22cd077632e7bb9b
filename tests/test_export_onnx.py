"""Export of tiny HF models with and without KV cache: ORT matches torch, the MatMul map is exact.

Relative error everywhere is max|ort - torch| / max|torch| over a logits tensor; float32 tolerance 1e-4.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from procrustes_onnx.errors import UserError
from procrustes_onnx.exporters.onnx_export import MAP_FILE, export_onnx
from procrustes_onnx.testing import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RTOL = 1e-4
ARCHS = ("llama", "qwen2", "opt")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@functools.lru_cache(maxsize=None)
def exported(arch: str, with_past: bool = True) -> tuple[torch.nn.Module, Path]:
    """One export per (arch, with_past) per test session: exports dominate the suite's time."""
    model = tiny_model(arch, seed=1)
    out = Path(tempfile.mkdtemp(prefix=f"export-{arch}-")) / "onnx"
    return model, export_onnx(model, out, with_past=with_past)


def kv_geometry(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv, config.hidden_size // heads


def torch_greedy(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[list[np.ndarray], torch.Tensor]:
    """Prefill + ``steps`` greedy decode steps with the HF cache; logits of each call and all tokens."""
    logits, tokens, past = [], prompt, None
    ids = prompt
    with torch.no_grad():
        for _ in range(steps + 1):
            mask = torch.ones(tokens.shape, dtype=torch.long)
            out = model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits.numpy())
            ids = out.logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, ids], dim=1)
    return logits, tokens


def ort_replay(session: ort.InferenceSession, config, tokens: torch.Tensor, prompt_len: int) -> list[np.ndarray]:
    """Feed the same token stream through the ONNX graph: prefill from an empty cache, then one token at a time."""
    layers, kv, hd = kv_geometry(config)
    batch = tokens.shape[0]
    past = {f"past_key_values.{i}.{k}": np.zeros((batch, kv, 0, hd), np.float32)
            for i in range(layers) for k in ("key", "value")}
    outs, start, end = [], 0, prompt_len
    while end <= tokens.shape[1] - 1:
        feed = {"input_ids": tokens[:, start:end].numpy(),
                "attention_mask": np.ones((batch, end), np.int64),
                "position_ids": np.tile(np.arange(start, end), (batch, 1)), **past}
        res = session.run(None, feed)
        outs.append(res[0])
        past = {k.replace("present", "past_key_values"): v
                for k, v in zip([o.name for o in session.get_outputs()][1:], res[1:])}
        start, end = end, end + 1
    return outs


def assert_decode_matches(model: torch.nn.Module, onnx_path: Path, *, steps: int = 3, seed: int = 0) -> None:
    torch.manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    ref, tokens = torch_greedy(model, prompt, steps)
    got = ort_replay(ort.InferenceSession(str(onnx_path)), model.config, tokens, prompt.shape[1])
    assert len(got) == steps + 1
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        assert rel_err(g, r) < RTOL
        assert np.array_equal(g.argmax(-1), r.argmax(-1))


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_export_prefill_and_decode_match_torch(arch):
    model, path = exported(arch)
    assert_decode_matches(model, path)


@pytest.mark.parametrize("arch", ARCHS)
def test_matmul_map_points_at_each_linear_weight(arch):
    model, path = exported(arch)
    mapping = json.loads((path.parent / MAP_FILE).read_text())
    graph = ir.load(path).graph
    nodes = {n.name: n for n in graph}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(mapping) == set(linears)
    for name, entry in mapping.items():
        node = nodes[entry["node"]]
        assert node.op_type == entry["op"]
        stored = graph.initializers[entry["weight"]].const_value.numpy()
        weight = linears[name].weight.detach().numpy()
        np.testing.assert_array_equal(stored, weight.T if entry["transposed"] else weight)
        assert entry["shape"] == [linears[name].in_features, linears[name].out_features]


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_embedding_stored_once(arch):
    model, path = exported(arch)
    emb = model.get_input_embeddings().weight.detach().numpy()
    graph = ir.load(path).graph
    copies = [v.name for v in graph.initializers.values()
              if v.const_value.size == emb.size and (np.array_equal(v.const_value.numpy(), emb)
                                                   or np.array_equal(v.const_value.numpy(), emb.T))]
    assert len(copies) == 1
    n_params = sum(p.numel() for p in model.parameters())  # parameters() yields the tied tensor once
    data_bytes = (path.parent / "model.onnx.data").stat().st_size
    assert data_bytes <= 4 * n_params + 4096  # only small constants (rotary freqs, shapes) on top


def test_io_names_follow_optimum():
    model, path = exported("llama")
    sess = ort.InferenceSession(str(path))
    layers = model.config.num_hidden_layers
    kv = [f"{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "position_ids"] + \
        [f"past_key_values.{n}" for n in kv]
    assert [o.name for o in sess.get_outputs()] == ["logits"] + [f"present.{n}" for n in kv]
    for name in ("config.json", "generation_config.json", "export.json"):
        assert (path.parent / name).is_file()


def test_logits_only_export_matches_torch():
    model, path = exported("opt", with_past=False)
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
