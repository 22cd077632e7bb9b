"""Real-model export (opt-in: PROCRUSTES_SLOW=1; about 1.5-3 minutes on 2 cores): SmolLM2-135M with KV
cache matches torch on a Jargon window and a few decode steps, and every Linear is in the map."""

from __future__ import annotations

import json

import pytest
import torch

from procrustes_onnx.exporters.onnx_export import MAP_FILE, export_onnx
from test_export_helpers import assert_decode_matches


@pytest.mark.slow
def test_smollm2_export_matches_torch(tmp_path):
    from procrustes_onnx.compiler.checkpoint import load_model

    model, tokenizer = load_model("smollm2-135m")
    path = export_onnx(model, tmp_path / "onnx", with_past=True, tokenizer=tokenizer)
    mapping = json.loads((path.parent / MAP_FILE).read_text())
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(mapping) == linears
    assert mapping["lm_head"]["transposed"] is False  # tied head: Transpose of the one embedding matrix
    assert (path.parent / "tokenizer.json").is_file()
    assert_decode_matches(model, path, steps=3)
