"""ORT perplexity equals torch perplexity; ORT generation with the KV cache equals torch generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.runtime.generate import SamplingConfig, generate, generate_ids, pick_token
from procrustes_onnx.runtime.perplexity import evaluate_perplexity, make_windows, torch_logits_fn
from procrustes_onnx.runtime.perplexity_ort import ort_logits_fn, tokenizer_for_onnx
from procrustes_onnx.runtime.session import OnnxCausalLM
from test_runtime_helpers import EOS


def test_ort_perplexity_equals_torch_within_0_1_percent(tiny):
    tokenizer = tokenizer_for_onnx(tiny.dir)
    text = "The quick brown fox jumps over the lazy dog. " * 12
    tokens = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = make_windows(tokens, window=64, max_tokens=None, max_windows=4)
    ref = evaluate_perplexity(torch_logits_fn(tiny.model), windows, batch_size=2, progress=False)
    got = evaluate_perplexity(ort_logits_fn(tiny.dir, threads=1), windows, batch_size=2, progress=False)
    assert got.tokens_scored == ref.tokens_scored == 4 * 63
    assert abs(got.ppl - ref.ppl) / ref.ppl < 1e-3
    with pytest.raises(UserError, match="exceeds the model's 512 positions"):
        ort_logits_fn(tiny.dir, threads=1)(torch.zeros(1, 513, dtype=torch.long))


def test_greedy_with_cache_equals_torch_generate(tiny):
    prompt = [72, 101, 108, 108, 111, 32]
    with torch.no_grad():
        ref = tiny.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  do_sample=False, max_new_tokens=24, eos_token_id=EOS, pad_token_id=EOS)
    ref_new = ref[0, len(prompt):].tolist()
    seen: list[int] = []
    got = generate_ids(OnnxCausalLM(tiny.onnx, threads=1), prompt, SamplingConfig(max_new_tokens=24),
                       eos_ids=[EOS], on_token=seen.append)
    assert len(ref_new) >= 8 and got.token_ids == ref_new and seen == ref_new
    assert got.stopped_by == ("eos" if ref_new[-1] == EOS else "max_new_tokens")


def test_sampling_is_seeded_and_filters():
    rng = np.random.default_rng
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert pick_token(logits, SamplingConfig(), rng(0)) == 0
    top1 = SamplingConfig(temperature=1.0, top_k=1)
    assert {pick_token(logits, top1, rng(s)) for s in range(20)} == {0}
    nucleus = SamplingConfig(temperature=1.0, top_p=0.75)  # keeps {0, 1}: 0.5 < 0.75 <= 0.8
    draws = [pick_token(logits, nucleus, rng(s)) for s in range(200)]
    assert set(draws) == {0, 1} and 0.5 < draws.count(0) / 200 < 0.75  # expected 0.625
    free = SamplingConfig(temperature=1.0, seed=3)
    a = [pick_token(logits, free, rng(s)) for s in range(50)]
    assert a == [pick_token(logits, free, rng(s)) for s in range(50)] and len(set(a)) == 4
    with pytest.raises(UserError, match="temperature"):
        SamplingConfig(temperature=-1).check()


def test_generate_streams_text(tiny):
    pieces: list[str] = []
    result = generate(tiny.dir, "Hello", max_new_tokens=8, temperature=0.8, top_k=50, seed=7, threads=1,
                      stream=pieces.append)
    assert "".join(pieces) == result.text and 1 <= len(result.token_ids) <= 8
    again = generate(tiny.dir, "Hello", max_new_tokens=8, temperature=0.8, top_k=50, seed=7, threads=1, stream=None)
    assert again.token_ids == result.token_ids
