"""Reusing the dense graph for a same-shaped compressed model: used when every weight fits, refused otherwise."""

import json

import torch

from procrustes_onnx.compiler.checkpoint import load_compressed, save_compressed
from procrustes_onnx.exporters.onnx_export import export_onnx
from procrustes_onnx.exporters.pipeline import export_compressed, ort_logits
from procrustes_onnx.exporters.weight_swap import swap_weights
from procrustes_onnx.testing import tiny_model
from test_export_helpers import add_random_shortcuts, rel_err, structured_tiny


def test_same_shaped_model_reuses_the_template_graph_and_matches_torch(tmp_path):
    template = export_onnx(tiny_model("llama", seed=5), tmp_path / "dense").parent
    structured, _, _ = structured_tiny("llama")
    save_compressed(structured, tmp_path / "ckpt")
    export_compressed(tmp_path / "ckpt", tmp_path / "out", dense_dir=tmp_path / "twin", templates=[template])
    assert json.loads((tmp_path / "twin" / "export.json").read_text())["traced"] is False
    model, _ = load_compressed(tmp_path / "ckpt")
    ids = torch.arange(3, 27)[None]
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.numpy()
    assert rel_err(ort_logits(tmp_path / "out" / "model.onnx", ids.numpy()), ref) < 1e-4
    assert rel_err(ort_logits(template / "model.onnx", ids.numpy()), ref) > 1e-2  # the template's own weights would be wrong


def test_model_with_extra_parameters_is_refused(tmp_path):
    template = export_onnx(tiny_model("llama", seed=5), tmp_path / "dense").parent
    structured, dense, _ = structured_tiny("llama")
    assert swap_weights(dense, template) is not None
    add_random_shortcuts(dense)  # skip matrices: parameters the dense graph has no place for
    assert swap_weights(dense, template) is None
    assert swap_weights(tiny_model("llama", seed=5, layers=3), template) is None
