"""Quantization-aware healing's rounding equals the exporter's: the torch model with its weights rounded by
``compiler.fake_quant`` gives the logits of the artifact ``quantize_artifact`` writes (float compute)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from procrustes_onnx.compiler.fake_quant import WeightQuant, quant_targets, quantized_weights, rtn_blockwise
from procrustes_onnx.exporters.pipeline import ort_logits
from procrustes_onnx.exporters.quantize import QUANT_FILE, QuantizeConfig, quantize_artifact
from test_export_helpers import STRUCTURED_DIR, exported, rel_err


@pytest.mark.parametrize("bits", [4, 8])
def test_rounded_torch_model_equals_the_quantized_artifact(tmp_path, bits):
    model, *_, dense_onnx = exported("llama")
    structured = dense_onnx.parent.parent / STRUCTURED_DIR
    out = quantize_artifact(structured, tmp_path / "q", QuantizeConfig(bits=bits, block_size=16, accuracy_level=0,
                                                                       min_elements=256))
    report = json.loads((out.parent / QUANT_FILE).read_text())
    quant = WeightQuant(bits=bits, block_size=16, min_elements=256)
    targets = quant_targets(model, quant)
    kinds = {t.name.rsplit(".", 1)[-1].split("[")[0] for t in targets}
    assert "weight" in kinds and kinds & {"left", "right"} and kinds & {"a", "b"}, kinds   # dense, GS, Kronecker
    packed_away = sum(len(p["packed"]) - 1 for p in report["packed"])  # siblings quantized as one MatMulNBits
    assert report["quantized_ops"]["MatMulNBits"] + packed_away >= len(targets) - 1
    ids = np.random.default_rng(0).integers(0, 256, size=(1, 12)).astype(np.int64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        plain = model(torch.from_numpy(ids)).logits.numpy()
        with quantized_weights(targets, quant):
            rounded = model(torch.from_numpy(ids)).logits.numpy()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "float weights not restored"
    got = ort_logits(out, ids)
    # int4: the same numbers; int8: within 2.3e-4 here, 60x closer than the float model (a few values round
    # differently in the 8-bit path)
    assert rel_err(got, rounded) < (1e-5 if bits == 4 else 1e-3)
    assert rel_err(got, plain) > 30 * rel_err(got, rounded)


def test_rtn_is_idempotent_and_keeps_the_peak():
    m = torch.randn(70, 9, generator=torch.Generator().manual_seed(1))
    q = rtn_blockwise(m, WeightQuant())
    torch.testing.assert_close(rtn_blockwise(q, WeightQuant()), q)
    assert torch.equal(q.abs().reshape(-1, 9)[m.abs().argmax(0), torch.arange(9)],
                       m.abs()[m.abs().argmax(0), torch.arange(9)])
    assert (q - m).abs().max() < m.abs().max() / 8
