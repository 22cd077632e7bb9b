"""What factoring SmolLM2's tied token table costs on its own: PPL (first N Jargon windows) with only the
embedding (and the tied head reading it) replaced by low-rank factors, per kept share and weighting.

Weightings: rows by token frequency in the calibration windows (none, sqrt, log, as
`procrustes.token_weights`), columns by the head input's Gram or not. Nothing else is compressed.

    python benchmarks/embedding_lowrank.py --windows 2 -> docs/results/embedding_lowrank.json
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    from procrustes_onnx.compiler.calibration import calibration_windows_for, collect_grams, damp_gram, token_counts
    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.compiler.compress import count_params
    from procrustes_onnx.compiler.config import CompressionConfig
    from procrustes_onnx.compiler.embeddings import install_factored_embedding
    from procrustes_onnx.compiler.procrustes import token_weights
    from procrustes_onnx.core.environment import write_results
    from procrustes_onnx.core.texts import load_text, tokenize_corpus
    from procrustes_onnx.ops.embedding import embedding_rank, project_embedding
    from procrustes_onnx.runtime.perplexity import evaluate_perplexity, make_windows, torch_logits_fn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--kept", default="0.75,0.5")
    p.add_argument("--calib", default="kjv")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--out", default="docs/results/embedding_lowrank.json")
    args = p.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    original = count_params(model)
    windows = make_windows(tokenize_corpus(tokenizer, load_text("jargon"), 102_400), 1024, 102_400, args.windows)
    cfg = CompressionConfig(calib_text=args.calib, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)
    calib = calibration_windows_for(tokenizer, cfg)
    table = model.model.embed_tokens.weight.detach().clone()
    vocab, dim = table.shape
    counts = token_counts(calib, vocab)
    with torch.no_grad():
        gram = damp_gram(collect_grams(model, calib, ["lm_head"], progress=False)["lm_head"], cfg.damp)
    embed, head = model.model.embed_tokens, model.lm_head
    rows = [{"variant": "dense", "ppl": evaluate_perplexity(torch_logits_fn(model), windows, progress=False).ppl}]
    print(f"dense: {rows[0]['ppl']:.2f}", flush=True)
    entry = {"path": "model.embed_tokens", "head": "lm_head", "tied": True}
    for kept in (float(k) for k in args.kept.split(",")):
        rank = embedding_rank(vocab, dim, kept)
        for weighting in ("none", "sqrt", "log"):
            for use_gram in (False, True):
                start = time.perf_counter()
                w = None if weighting == "none" else token_weights(counts, weighting)
                a, b = project_embedding(table, rank, w, gram if use_gram else None)
                install_factored_embedding(model, entry, a, b)
                ppl = evaluate_perplexity(torch_logits_fn(model), windows, progress=False).ppl
                model.model.embed_tokens, model.lm_head = embed, head
                row = {"variant": f"{weighting}{'+head-gram' if use_gram else ''}", "kept": kept, "rank": rank,
                       "removed_pct": round(100 * (vocab * dim - rank * (vocab + dim)) / original, 2),
                       "ppl": ppl, "seconds": round(time.perf_counter() - start, 1)}
                rows.append(row)
                print(f"kept {kept} rank {rank} {row['variant']:16} PPL {ppl:10.2f}", flush=True)
    write_results(args.out, {"model": "smollm2-135m", "windows": args.windows, "calib": args.calib,
                             "calib_tokens": int(calib.numel()), "rows": rows})


if __name__ == "__main__":
    main()
