"""Opt-in (PROCRUSTES_SLOW=1): SmolLM2-135M exported to ONNX agrees with torch on perplexity, lm-eval and greedy text."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.exporters import export_onnx

    model, tokenizer = load_model("smollm2-135m")
    out = export_onnx(model, tmp_path_factory.mktemp("smol") / "dense", with_past=True, tokenizer=tokenizer)
    return model, tokenizer, out.parent


def test_ort_ppl_equals_torch_within_0_1_percent(smol):
    from procrustes_onnx.core.texts import load_text, tokenize_corpus
    from procrustes_onnx.runtime.perplexity import evaluate_perplexity, make_windows, torch_logits_fn
    from procrustes_onnx.runtime.perplexity_ort import ort_logits_fn

    model, tokenizer, folder = smol
    windows = make_windows(tokenize_corpus(tokenizer, load_text("jargon"), 4096), 1024, 4096)
    ref = evaluate_perplexity(torch_logits_fn(model), windows, progress=False)
    got = evaluate_perplexity(ort_logits_fn(folder), windows, progress=False)
    assert abs(got.ppl - ref.ppl) / ref.ppl < 1e-3, (got.ppl, ref.ppl)


def test_lm_eval_adapter_agrees_with_hf(smol):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from procrustes_onnx.runtime.lm_eval_adapter import TASK_DIR, run_eval

    model, tokenizer, folder = smol
    tasks, limit = ["jargon_cloze", "kjv_cloze"], 100
    ours = run_eval(folder, tasks, limit=limit)["results"]
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), tasks=tasks,
                                  limit=limit, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False))
    for task in tasks:
        for metric in ("acc,none", "acc_norm,none"):
            assert abs(ours[task][metric] - ref["results"][task][metric]) <= 0.005, (task, metric)
