"""Benchmark helpers: MAC counts match a hand count, measurements have the right shape, fusions keep outputs."""

from __future__ import annotations

import numpy as np

from procrustes_onnx.runtime.benchmark import bytes_on_disk, fusion_report, matmul_macs_per_token, measure_model
from procrustes_onnx.runtime.session import OnnxCausalLM
from test_runtime_helpers import VOCAB


def test_macs_match_hand_count(tiny):
    c = tiny.model.config
    d, ff, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ff
    macs = matmul_macs_per_token(tiny.dir)
    assert macs["macs_per_token"] == c.num_hidden_layers * per_layer + d * VOCAB
    assert macs["lm_head_macs"] == d * VOCAB


def test_measure_model_reports_every_number(tiny):
    r = measure_model(tiny.dir, prefill=[(1, 8), (2, 16)], decode_prompt=8, decode_tokens=4, repeats=1, threads=1)
    assert [(p["batch"], p["seq"]) for p in r["prefill"]] == [(1, 8), (2, 16)]
    assert all(p["seconds"] > 0 for p in r["prefill"]) and r["decode"]["new_tokens"] == 4
    assert r["decode"]["tokens_per_s"] > 0 and r["session_seconds"] > 0
    assert r["bytes_on_disk"] == bytes_on_disk(tiny.onnx) > (tiny.onnx.parent / "model.onnx.data").stat().st_size
    assert r["peak_rss_mib"] >= r["rss_mib_after_session"] > 0


def test_ort_fusions_keep_logits_and_cache(tiny, tmp_path):
    report = fusion_report(tiny.dir, tmp_path / "fused" / "model.onnx")
    assert report["fusions"].get("rms_normalization", 0) > 0, report
    base, fused = OnnxCausalLM(tiny.dir, threads=1), OnnxCausalLM(tmp_path / "fused", threads=1)
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 7))
    (a, ca), (b, cb) = base.prefill(ids), fused.prefill(ids)
    scale = np.abs(a).max()
    assert np.abs(a - b).max() / scale < 1e-4
    sa, _ = base.decode_step(a.argmax(-1), ca)
    sb, _ = fused.decode_step(a.argmax(-1), cb)
    assert np.abs(sa - sb).max() / scale < 1e-4
