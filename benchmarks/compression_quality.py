"""Compression quality on SmolLM2 (Jargon protocol): dense, SliceGPT, F/W-Kron, F/W-GS at 14/20/25% of the
parameters removed, global and per-position rotation: exact removed %, PPL, compression wall time, peak memory.

Each row runs in its own subprocess (clean peak-memory numbers, no state shared between rows) and is
appended to the JSON as soon as it finishes, so a long run can be stopped and continued with --resume.
Row ids: ``dense``, ``slicegpt-20``, ``wkron-20-global``, ``fgs-14-per-position``, ... (``--rows all``);
a ProcrustesGPT id + ``-emb`` also factors the token embedding (``--compress-embeddings``, 3/4 kept).
Full PPL is 100 windows x ~2.8 s on 2 cores: use ``--windows N`` for quick comparisons.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RATIOS = (14, 20, 25)
ROTATIONS = ("global", "per-position")
METHODS = {"f": "frobenius", "w": "weighted"}
ALL_ROWS = (["dense"] + [f"slicegpt-{r}" for r in RATIOS]
            + [f"{m}{s}-{r}-{rot}" for s in ("kron", "gs") for m in ("f", "w") for r in RATIOS for rot in ROTATIONS])
EMB_SUFFIX = "-emb"   # a ProcrustesGPT row id + "-emb": the same with --compress-embeddings (embedding kept 3/4)


def known_row(row: str) -> bool:
    base = row[: -len(EMB_SUFFIX)] if row.endswith(EMB_SUFFIX) else row
    return base in ALL_ROWS and (base == row or base[0] in METHODS)


def row_config(row: str, args: argparse.Namespace) -> dict:
    """CompressionConfig fields for one row id (plus the shared solver settings from the command line)."""
    common = {"iterations": args.iterations, "rotation_iters": args.rotation_iters, "calib_samples": args.calib_samples,
              "calib_seq_len": args.calib_seq_len, "seed": 0}
    common.update(json.loads(args.extra))
    if row.startswith("slicegpt-"):
        return {**common, "method": "slicegpt", "ratio": int(row.split("-")[1]) / 100}
    if row.endswith(EMB_SUFFIX):
        common["compress_embeddings"] = True
        row = row[: -len(EMB_SUFFIX)]
    head, ratio, rotation = row.split("-", 2)
    return {**common, "method": METHODS[head[0]], "structure": head[1:], "ratio": int(ratio) / 100,
            "rotation": rotation}


def run_one(row: str, args: argparse.Namespace) -> dict:
    """Compress (in memory) and score one row; called inside the row's subprocess."""
    import torch

    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.compiler.compress import compress_model, count_params
    from procrustes_onnx.compiler.config import CompressionConfig
    from procrustes_onnx.core.texts import load_text, tokenize_corpus
    from procrustes_onnx.runtime.perplexity import evaluate_perplexity, make_windows, torch_logits_fn

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    original = count_params(model)
    windows = make_windows(tokenize_corpus(tokenizer, load_text("jargon"), 102_400), 1024, 102_400, args.windows)
    start = time.perf_counter()
    result: dict = {"row": row}
    if row != "dense":
        cfg = CompressionConfig(**row_config(row, args))
        result["config"] = cfg.to_dict()
        if cfg.method == "slicegpt":
            from procrustes_onnx.compiler.calibration import calibration_windows_for
            from procrustes_onnx.compiler.slicegpt import slice_model
            calib = calibration_windows_for(tokenizer, cfg)
            result["slicegpt"] = slice_model(model, calib, ratio=cfg.ratio, original_params=original)
        else:
            work = Path(args.work) / row
            plan = compress_model(model, tokenizer, cfg, work, progress=False, echo=lambda s: print(s, flush=True))
            result["promised_params"] = plan.promised_params
    result["compress_seconds"] = round(time.perf_counter() - start, 1)
    result["params"] = count_params(model)
    result["removed_pct"] = round(100 * (1 - result["params"] / original), 3)
    ppl = evaluate_perplexity(torch_logits_fn(model), windows, progress=False)
    result.update(ppl=ppl.ppl, nll=ppl.nll, windows=ppl.windows, ppl_seconds=round(ppl.seconds, 1),
                  peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="dense,slicegpt-20,fkron-20-global,wkron-20-global",
                        help="comma-separated row ids, or 'all'")
    parser.add_argument("--windows", type=int, default=None, help="first N Jargon windows (default: all 100)")
    parser.add_argument("--iterations", type=int, default=10, help="Frobenius ALS iterations")
    parser.add_argument("--rotation-iters", type=int, default=50)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--extra", default="{}", help="JSON of further CompressionConfig fields for every row")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "compression_quality"))
    parser.add_argument("--out", default="docs/results/compression_quality.json")
    parser.add_argument("--resume", action="store_true", help="skip rows already in --out with the same windows")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import logging
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.one} %(name)s: %(message)s")
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return
    rows = ALL_ROWS if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if not known_row(r)]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {', '.join(ALL_ROWS)}")
    results = _load(args) if args.resume else []
    done = {r["row"] for r in results}
    for row in rows:
        if row in done:
            continue
        cmd = [sys.executable, __file__, "--one", row] + _passthrough(args)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress and logs go to stderr
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        print("\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("RESULT ")), file=sys.stderr)
        if proc.returncode != 0 or not lines:
            print(f"{row}: failed (exit {proc.returncode})", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][7:]))
        _write(args, results)
        _print(results)


def _passthrough(args) -> list[str]:
    out = []
    for name in ("windows", "iterations", "rotation_iters", "calib_samples", "calib_seq_len", "extra", "model",
                 "threads", "work"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def _load(args) -> list[dict]:
    path = Path(args.out)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [r for r in data.get("rows", []) if r.get("windows") == (args.windows or 100)]


def _write(args, results: list[dict]) -> None:
    from procrustes_onnx.core.environment import write_results
    dense = next((r["ppl"] for r in results if r["row"] == "dense"), None)
    write_results(args.out, {"model": args.model, "protocol": "jargon, 1024-token windows, first 102,400 tokens",
                             "windows": args.windows or 100, "threads": args.threads, "dense_ppl": dense,
                             "rows": results})


def _print(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    dense = next((r["ppl"] for r in results if r["row"] == "dense"), None)
    table = Table(title="SmolLM2-135M compression quality (Jargon PPL)")
    for col in ("row", "removed %", "PPL", "x dense", "compress s", "peak GiB", "windows"):
        table.add_column(col, justify="right")
    for r in results:
        ratio = f"{r['ppl'] / dense:.2f}" if dense else "-"
        table.add_row(r["row"], f"{r['removed_pct']:.2f}", f"{r['ppl']:.2f}", ratio, f"{r['compress_seconds']:.0f}",
                      f"{r['peak_rss_gib']:.2f}", str(r["windows"]))
    Console().print(table)


if __name__ == "__main__":
    main()
