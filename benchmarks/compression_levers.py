"""What moves ProcrustesGPT's quality on SmolLM2: one compressed model per labelled CompressionConfig variant,
scored on the Jargon protocol (first N windows) and on held-out KJV windows (tokens 300,000+, outside the
default calibration draw), so calibration-domain effects are visible.

    python benchmarks/compression_levers.py --variant base='{}' --variant jcal='{"calib_text": "jargon@102400"}'

Variants share nothing but the model; each uses its own work folder (so a rerun reuses finished solves).
Appends rows to docs/results/compression_levers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = dict(iterations=10, rotation_iters=50, calib_samples=16, calib_seq_len=512, seed=0, method="weighted",
            structure="kron", ratio=0.2, rotation="global")


def main() -> None:
    import torch

    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.compiler.compress import compress_model, count_params
    from procrustes_onnx.compiler.config import CompressionConfig
    from procrustes_onnx.core.environment import environment
    from procrustes_onnx.core.texts import load_text, tokenize_corpus
    from procrustes_onnx.runtime.perplexity import evaluate_perplexity, make_windows, torch_logits_fn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], help="label=JSON of CompressionConfig overrides")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "compression_levers"))
    p.add_argument("--out", default="docs/results/compression_levers.json")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    _, tok = load_model("smollm2-135m")
    jargon = make_windows(tokenize_corpus(tok, load_text("jargon"), 102_400), 1024, 102_400, args.windows)
    kjv = tokenize_corpus(tok, load_text("kjv"), 300_000 + args.windows * 1024)[300_000:].reshape(args.windows, 1024)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    data.update(environment())
    for item in ["dense={}"] + args.variant:
        label, _, spec = item.partition("=")
        model, tok = load_model("smollm2-135m")
        original = count_params(model)
        row = {"label": label, "windows": args.windows}
        start = time.perf_counter()
        if label != "dense":
            cfg = CompressionConfig(**{**BASE, **json.loads(spec or "{}")})
            if cfg.method == "slicegpt":
                from procrustes_onnx.compiler.calibration import calibration_windows_for
                from procrustes_onnx.compiler.slicegpt import slice_model
                slice_model(model, calibration_windows_for(tok, cfg), ratio=cfg.ratio, original_params=original)
            else:
                compress_model(model, tok, cfg, Path(args.work) / label, progress=False, echo=lambda s: None)
            row["config"] = cfg.to_dict()
        row["compress_seconds"] = round(time.perf_counter() - start, 1)
        row["removed_pct"] = round(100 * (1 - count_params(model) / original), 3)
        row["jargon_ppl"] = evaluate_perplexity(torch_logits_fn(model), jargon, progress=False).ppl
        row["kjv_ppl"] = evaluate_perplexity(torch_logits_fn(model), kjv, progress=False).ppl
        print(f"{label:>24}  removed {row['removed_pct']:6.2f}%  jargon {row['jargon_ppl']:10.2f}  "
              f"kjv {row['kjv_ppl']:10.2f}  {row['compress_seconds']:6.0f} s", flush=True)
        data["rows"] = [r for r in data["rows"] if r["label"] != label] + [row]
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(out)


if __name__ == "__main__":
    main()
