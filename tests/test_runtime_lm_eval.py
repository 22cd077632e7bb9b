"""The ONNX lm-eval adapter agrees with lm-eval's own `hf` model on the local tasks; generate_until uses the cache."""

from __future__ import annotations

import json

import pytest
import torch

from procrustes_onnx.core.errors import UserError

LIMIT = 12


def _hf_results(tiny, tasks):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from procrustes_onnx.runtime.lm_eval_adapter import TASK_DIR

    hf = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=4, max_length=512)
    return lm_eval.simple_evaluate(model=hf, tasks=tasks, limit=LIMIT, bootstrap_iters=0, log_samples=True,
                                   task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False))


def test_adapter_agrees_with_hf_model(tiny, tmp_path):
    from procrustes_onnx.runtime.lm_eval_adapter import run_eval

    tasks = ["jargon_cloze", "kjv_ppl"]
    ours = run_eval(tiny.dir, tasks, limit=LIMIT, threads=1, log_samples=True, output=tmp_path / "eval.json")
    ref = _hf_results(tiny, tasks)
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["jargon_cloze"]["sample_len"] == LIMIT
    for metric in ("acc,none", "acc_norm,none"):
        assert abs(ours["results"]["jargon_cloze"][metric] - ref["results"]["jargon_cloze"][metric]) <= 0.005
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        a, b = ours["results"]["kjv_ppl"][metric], ref["results"]["kjv_ppl"][metric]
        assert abs(a - b) / b < 1e-4, (metric, a, b)
    # per request, not only the aggregate: every choice's log-likelihood matches to 1e-3 nats
    got = [r[0][0] for s in ours["samples"]["jargon_cloze"] for r in s["resps"]]
    want = [r[0][0] for s in ref["samples"]["jargon_cloze"] for r in s["resps"]]
    assert len(got) == len(want) == 4 * LIMIT
    assert max(abs(float(x) - float(y)) for x, y in zip(got, want)) < 1e-3


def test_generate_until_stops_and_matches_torch_greedy(tiny):
    from lm_eval.api.instance import Instance

    from procrustes_onnx.runtime.lm_eval_adapter import OnnxLM

    lm = OnnxLM(str(tiny.dir), threads=1)
    prompt = "In the beginning"
    ids = tiny.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = tiny.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  do_sample=False, max_new_tokens=10, eos_token_id=256, pad_token_id=256)
    ref_text = tiny.tokenizer.decode([t for t in ref[0, len(ids):].tolist() if t != 256])
    req = Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 10, "do_sample": False}), 0)
    assert lm.generate_until([req], disable_tqdm=True) == [ref_text]
    stop = ref_text[3:5]  # a stop string inside the greedy text cuts it just before the stop
    if stop:
        req = Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 10}), 0)
        assert lm.generate_until([req], disable_tqdm=True) == [ref_text.split(stop)[0]]


def test_unknown_task_is_a_user_error(tiny):
    from procrustes_onnx.runtime.lm_eval_adapter import run_eval

    with pytest.raises(UserError, match="no tasks given"):
        run_eval(tiny.dir, "")
