"""Quantization-aware healing on SmolLM2 at 20% removed: int4 PPL of the exported artifact when healing ran
through the int4 rounding (``--heal-quantize int4``) against the same healing without it.

Arms, each from the same training-free checkpoint (benchmarks/healing.py's, made once into --checkpoints):
``start`` (no healing), ``plain`` (e2e healing, float weights) and ``qat`` (e2e healing through the rounding),
each exported, quantized with ``export --quantize``'s defaults (int4, block 32, symmetric RTN, accuracy level
4) and scored in ONNX Runtime on the first --windows Jargon windows; the healed torch model's fp32 PPL too.
One arm per subprocess, one at a time; rows are appended to the JSON as they finish (--resume skips them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from subprocess_worker import run_one  # noqa: E402
ARMS = {"start": "none", "plain": "none", "qat": "int4"}


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    import torch

    from healing import ensure_checkpoint
    from procrustes_onnx.compiler.checkpoint import load_compressed, load_model
    from procrustes_onnx.compiler.heal import HealConfig, heal_checkpoint
    from procrustes_onnx.core.sources import cache_root
    from procrustes_onnx.core.texts import load_text, tokenize_corpus
    from procrustes_onnx.exporters.pipeline import export_compressed
    from procrustes_onnx.exporters.quantize import QuantizeConfig, quantize_artifact
    from procrustes_onnx.runtime.perplexity import evaluate_perplexity, make_windows, torch_logits_fn
    from procrustes_onnx.runtime.perplexity_ort import ort_logits_fn

    torch.set_num_threads(args.threads)
    work = Path(args.work) / f"{args.variant}-{arm}-{args.tokens}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = ensure_checkpoint(args.variant, Path(args.checkpoints))
    teacher, tokenizer = load_model("smollm2-135m")
    row: dict = {"arm": arm, "variant": args.variant, "checkpoint": ckpt.name, "tokens": 0 if arm == "start" else args.tokens}
    start = time.perf_counter()
    if arm != "start":
        config = HealConfig(tokens=args.tokens, text=args.text, seq_len=args.seq_len, batch_size=args.batch_size,
                            quantize=ARMS[arm], lr=args.lr, threads=args.threads)
        ckpt = heal_checkpoint(ckpt, work / "checkpoint", teacher, tokenizer, config,
                               teacher_cache=cache_root() / "heal-teacher", progress=False, echo=lambda s: None)
        row["heal"] = config.to_dict()
        row["heldout_kl"] = json.loads((ckpt / "healing.json").read_text())["report"]["heldout_after"]
    row["heal_s"] = round(time.perf_counter() - start, 1)
    del teacher
    tokens_eval = tokenize_corpus(tokenizer, load_text("jargon"), 102_400)
    windows = make_windows(tokens_eval, 1024, 102_400, args.windows)
    student, _ = load_compressed(ckpt)
    row["ppl_fp32_torch"] = round(evaluate_perplexity(torch_logits_fn(student), windows).ppl, 3)
    del student
    onnx = export_compressed(ckpt, work / "onnx")
    q = quantize_artifact(onnx if onnx.is_dir() else onnx.parent, work / "int4", QuantizeConfig(bits=4))
    row["int4_mb"] = round(sum(f.stat().st_size for f in q.parent.iterdir() if f.is_file()) / 1e6, 1)
    row["ppl_int4_ort"] = round(evaluate_perplexity(ort_logits_fn(q, threads=args.threads), windows).ppl, 3)
    row["windows"] = args.windows
    row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="w-gs")
    p.add_argument("--arms", default="start,plain,qat")
    p.add_argument("--tokens", type=int, default=25_600)
    p.add_argument("--text", default="mix")
    p.add_argument("--lr", type=float, help="peak learning rate (default: heal's e2e default)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--checkpoints", default=str(ROOT / "artifacts" / "heal-bench"))
    p.add_argument("--work", default=str(ROOT / "artifacts" / "qat-bench"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "qat_healing.json"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep each arm's checkpoint and artifacts")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_arm(args.one, args)), flush=True)
        return 0

    from procrustes_onnx.core.environment import write_results

    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if args.resume and out.is_file() else []
    done = {(r["variant"], r["arm"], r["tokens"]) for r in rows}
    forward = [a for k, v in vars(args).items() if k not in ("arms", "out", "resume", "one", "keep") and v is not None
               for a in (f"--{k.replace('_', '-')}", str(v))] + (["--keep"] if args.keep else [])
    for arm in args.arms.split(","):
        if (args.variant, arm, 0 if arm == "start" else args.tokens) in done:
            continue
        r = run_one(__file__, arm, forward)
        if r is None:
            return 1
        rows.append(r)
        print(f"{r['variant']:8s} {r['arm']:6s} tokens {r['tokens']:>7,}  fp32 {r['ppl_fp32_torch']:>9.2f}  "
              f"int4 {r['ppl_int4_ort']:>9.2f}  ({r['int4_mb']} MB)  heal {r['heal_s']} s", flush=True)
        write_results(out, {"benchmark": "qat_healing", "dense_ppl_8_windows": 20.40, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
