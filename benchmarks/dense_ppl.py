"""Dense perplexity of the default model on the evaluation protocol (Jargon) and on the KJV.

Writes docs/results/dense_ppl.json. Protocol: non-overlapping 1024-token windows of the first 102,400 tokens,
no BOS, float32, position 0 of each window unscored; KJV on its first 204,800 tokens."""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from rich.console import Console
from rich.table import Table

from procrustes_onnx.compiler.checkpoint import load_model
from procrustes_onnx.core.environment import write_results
from procrustes_onnx.core.texts import load_text, tokenize_corpus
from procrustes_onnx.runtime.perplexity import evaluate_perplexity, make_windows, torch_logits_fn

CORPORA = {"jargon": 102_400, "kjv": 204_800}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-windows", type=int, default=None, help="fewer windows for a smoke run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", default="docs/results/dense_ppl.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    rows = {}
    for corpus, max_tokens in CORPORA.items():
        windows = make_windows(tokenize_corpus(tokenizer, load_text(corpus), max_tokens), 1024, max_tokens,
                               args.max_windows)
        rows[corpus] = evaluate_perplexity(torch_logits_fn(model), windows, desc=corpus).to_dict()
    table = Table(title=f"dense perplexity, {args.model}, torch float32, {args.threads} threads")
    for col in ("corpus", "ppl", "nll", "tokens scored", "windows", "tok/s"):
        table.add_column(col, justify="right")
    for corpus, r in rows.items():
        table.add_row(corpus, f"{r['ppl']:.3f}", f"{r['nll']:.4f}", f"{r['tokens_scored']:,}", str(r["windows"]),
                      f"{r['tokens_per_s']:.0f}")
    Console().print(table)
    write_results(args.out, {"model": args.model, "threads": args.threads, "window": 1024, "results": rows,
                             "complete_protocol": args.max_windows is None})


if __name__ == "__main__":
    main()
