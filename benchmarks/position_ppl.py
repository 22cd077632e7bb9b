"""PPL by position inside the evaluation's 1,024-token windows: dense, a training-free checkpoint, and that
checkpoint healed (the best state an e2e heal left in its work folder), on the first --windows Jargon windows.

Why: healing trained on 256-token windows never sees positions 256-1023, which the evaluation scores.
``python benchmarks/position_ppl.py --checkpoint artifacts/heal-bench/w-gs-20-mix-measured
--state seq256=artifacts/heal-bench/work/w-gs-e2e-25600/heal-e2e-state.pt --state seq1024=...``
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
BUCKETS = ((0, 255), (255, 511), (511, 1023))   # next-token targets 1-255, 256-511, 512-1023


def position_ppl(model, windows) -> list[float]:
    import torch

    nll = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None], use_cache=False).logits[0, :-1].float()
            nll.append(torch.nn.functional.cross_entropy(logits, w[1:], reduction="none"))
    per = torch.stack(nll).mean(0)
    return [round(float(torch.exp(per[a:b].mean())), 3) for a, b in BUCKETS]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--state", action="append", default=[], help="LABEL=path of a heal-e2e-state.pt")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "position_ppl.json"))
    args = p.parse_args()

    import torch

    from procrustes_onnx.compiler.checkpoint import load_compressed, load_model
    from procrustes_onnx.compiler.heal import restore_parameters, trainable_parameters
    from procrustes_onnx.core.environment import write_results
    from procrustes_onnx.core.texts import load_text, tokenize_corpus
    from procrustes_onnx.runtime.perplexity import make_windows

    torch.set_num_threads(args.threads)
    dense, tokenizer = load_model("smollm2-135m")
    windows = make_windows(tokenize_corpus(tokenizer, load_text("jargon"), 102_400), 1024, 102_400, args.windows)
    rows = {"dense": position_ppl(dense, windows)}
    del dense
    student, _ = load_compressed(args.checkpoint)
    rows["start"] = position_ppl(student, windows)
    params = trainable_parameters(student)
    for item in args.state:
        label, _, path = item.partition("=")
        restore_parameters(params, torch.load(path, weights_only=False)["best_state"])
        rows[label] = position_ppl(student, windows)
    buckets = [f"{a + 1}-{b}" for a, b in BUCKETS]
    print(f"{'model':10s} " + " ".join(f"{b:>16s}" for b in buckets))
    for label, ppl in rows.items():
        ratio = [x / d for x, d in zip(ppl, rows["dense"])]
        print(f"{label:10s} " + " ".join(f"{x:9.2f} ({r:4.2f}x)" for x, r in zip(ppl, ratio)))
    write_results(args.out, {"benchmark": "position_ppl", "checkpoint": Path(args.checkpoint).name,
                             "windows": args.windows, "buckets": buckets, "states": dict(s.partition("=")[::2] for s in args.state),
                             "ppl": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
