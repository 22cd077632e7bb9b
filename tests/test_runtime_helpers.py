"""Shared runtime fixtures: a tiny Llama with a byte tokenizer, exported once per test session with a KV cache.

The `tiny` fixture (tests/conftest.py) is `tiny_artifact()`; tests that need it outside a fixture import it from here.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from procrustes_onnx.exporters import export_onnx
from procrustes_onnx.testing import tiny_model, tiny_tokenizer

VOCAB = 257  # 256 bytes + <|endoftext|>
EOS = 256


@functools.cache
def tiny_artifact(attention: str = "auto") -> SimpleNamespace:
    """(model, tokenizer, dir, onnx): a tiny Llama exported with its KV cache, config and tokenizer, once
    (the default attention: fused GQA; "unfused" for what only the unfused graph takes, left padding)."""
    model = tiny_model("llama", vocab=VOCAB)
    model.config.eos_token_id = model.config.bos_token_id = model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = EOS
    model.config.pad_token_id = model.generation_config.pad_token_id = None
    tokenizer = tiny_tokenizer()
    out = Path(tempfile.mkdtemp(prefix="runtime-tiny-"))
    atexit.register(shutil.rmtree, out, True)
    onnx_path = export_onnx(model, out, with_past=True, tokenizer=tokenizer, attention=attention)
    return SimpleNamespace(model=model, tokenizer=tokenizer, dir=out, onnx=Path(onnx_path))


def test_artifact_matches_torch_full_and_cached(tiny):
    """The exported graph equals torch for a full pass and for prefill + one decode step (rel. err < 1e-4)."""
    from procrustes_onnx.runtime.session import OnnxCausalLM

    lm = OnnxCausalLM(tiny.onnx, threads=1)
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 9))
    with torch.no_grad():
        ref = tiny.model(torch.from_numpy(ids)).logits.numpy()
    full = lm.logits(ids)
    assert np.abs(full - ref).max() / np.abs(ref).max() < 1e-4
    last, cache = lm.prefill(ids[:, :8])
    step, cache = lm.decode_step(ids[:, 8], cache)
    assert cache.length == 9 and cache.tensors["past_key_values.0.key"].shape[2] == 9
    assert np.abs(last - ref[:, 7]).max() / np.abs(ref).max() < 1e-4
    assert np.abs(step - ref[:, 8]).max() / np.abs(ref).max() < 1e-4
