"""Shared runtime fixtures: a tiny Llama with a byte tokenizer, exported once per test session with a KV cache.

Other tests/test_runtime_*.py import `tiny_artifact` from here. Engineer C's `export_onnx` is used when it
exists; until then the export-notes.md recipe below produces the same optimum-style I/O names.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from procrustes_onnx.testing import tiny_model

VOCAB = 257  # 256 bytes + <|endoftext|>
EOS = 256


def _bytes_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b), cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer():
    """A GPT-2-style byte-level tokenizer with no merges: 256 byte tokens and one EOS, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()} | {"<|endoftext|>": EOS}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _fallback_export(model: torch.nn.Module, out_dir: Path) -> Path:
    """The export-notes.md recipe: flat tensors in, DynamicCache inside, optimum names out."""
    from transformers.cache_utils import DynamicCache

    cfg = model.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    b, t, p = 2, 3, 5
    args = (torch.zeros(b, t, dtype=torch.long), torch.ones(b, t + p, dtype=torch.long),
            torch.arange(p, p + t).expand(b, t), *[torch.randn(b, kv_heads, p, head_dim) for _ in range(2 * layers)])
    B, S, P, T = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dyn = ({0: B, 1: S}, {0: B, 1: T}, {0: B, 1: S}, tuple({0: B, 2: P} for _ in range(2 * layers)))
    kv = [f"{i}.{k}" for i in range(layers) for k in ("key", "value")]
    path = out_dir / "model.onnx"
    torch.onnx.export(Wrapper(model), args, str(path), dynamo=True, dynamic_shapes=dyn, external_data=True,
                      input_names=["input_ids", "attention_mask", "position_ids", *[f"past_key_values.{n}" for n in kv]],
                      output_names=["logits", *[f"present.{n}" for n in kv]], verbose=False)
    model.config.save_pretrained(out_dir)
    return path


@functools.cache
def tiny_artifact() -> SimpleNamespace:
    """(model, tokenizer, dir, onnx): a tiny Llama exported with its KV cache, config and tokenizer, once."""
    model = tiny_model("llama", vocab=VOCAB)
    model.config.eos_token_id = model.config.bos_token_id = model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = EOS
    model.config.pad_token_id = model.generation_config.pad_token_id = None
    tokenizer = byte_tokenizer()
    out = Path(tempfile.mkdtemp(prefix="runtime-tiny-"))
    atexit.register(shutil.rmtree, out, True)
    try:
        from procrustes_onnx.exporters import export_onnx
    except ImportError:
        export_onnx = None
    if export_onnx is not None:
        onnx_path = export_onnx(model, out, with_past=True, tokenizer=tokenizer)
    else:
        onnx_path = _fallback_export(model, out)
        tokenizer.save_pretrained(out)
    return SimpleNamespace(model=model, tokenizer=tokenizer, dir=out, onnx=Path(onnx_path))


@pytest.fixture(scope="session")
def tiny():
    return tiny_artifact()


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
