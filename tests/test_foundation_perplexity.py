import math

import pytest
import torch

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.runtime.perplexity import evaluate_perplexity, make_windows, torch_logits_fn
from procrustes_onnx.testing import tiny_model


def test_uniform_model_has_vocab_size_perplexity():
    vocab = 50
    windows = make_windows(torch.randint(0, vocab, (1000,)), window=100, max_tokens=None)
    result = evaluate_perplexity(lambda ids: torch.zeros(*ids.shape, vocab), windows, batch_size=3, progress=False)
    assert math.isclose(result.ppl, vocab, rel_tol=1e-6)
    assert result.windows == 10 and result.tokens_scored == 10 * 99  # position 0 of each window unscored


def test_windows_truncate_and_drop_partial():
    tokens = torch.arange(2500)
    w = make_windows(tokens, window=1000, max_tokens=2400)
    assert w.shape == (2, 1000) and w[1, 0].item() == 1000
    assert make_windows(tokens, 100, None, max_windows=3).shape == (3, 100)
    with pytest.raises(UserError, match="fewer than one"):
        make_windows(tokens[:10], window=100)


def test_torch_perplexity_matches_manual_nll_and_batching():
    model = tiny_model("llama")
    windows = make_windows(torch.randint(0, 256, (4 * 33,), generator=torch.Generator().manual_seed(1)), 33, None)
    one = evaluate_perplexity(torch_logits_fn(model), windows, batch_size=1, progress=False)
    two = evaluate_perplexity(torch_logits_fn(model), windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1)).item()
    assert math.isclose(one.nll, manual, rel_tol=1e-5)
    assert math.isclose(one.ppl, two.ppl, rel_tol=1e-5)


def test_window_longer_than_model_is_user_error():
    model = tiny_model("llama")
    fn = torch_logits_fn(model)
    with pytest.raises(UserError, match="exceeds"):
        fn(torch.zeros(1, model.config.max_position_embeddings + 1, dtype=torch.long))
