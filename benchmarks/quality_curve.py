"""The quality-vs-size curve of SmolLM2: SliceGPT, W-Kron and W-GS (uniform and measured allocation) at
several removals, and the `--max-loss` operating points.

One rotation per structure, solved (global, the main job's solver settings) for the uniform plan at
MAX_LOSS_ROTATION_RATIO exactly as `compress --max-loss` solves it; every row of that structure is then
projected at that rotation: uniform rows with the weighted projection at the uniform plan's specs, measured
rows from the loss ladder (`compiler.allocate`). So a row's compression time is the shared solve plus its
own projections (both listed). SliceGPT rows slice the dense model afresh with the same calibration windows.
PPL is over the first --windows Jargon windows in torch fp32 (the exactness tests pin ORT to torch), and
on the full protocol for the --full ratios. Held-out loss is on calibration text after the calibration range.

    python benchmarks/quality_curve.py --phases dense,gs,slicegpt,kron
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RATIOS = (0.02, 0.05, 0.08, 0.11, 0.14, 0.20, 0.25)
SOLVER = {"iterations": 10, "rotation_iters": 50, "calib_samples": 16, "calib_seq_len": 512}


def _rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


class Scorer:
    """Jargon PPL (first N windows, and the full protocol on request) and held-out calibration NLL."""

    def __init__(self, tokenizer, windows: int, heldout) -> None:
        from procrustes_onnx.core.texts import load_text, tokenize_corpus
        from procrustes_onnx.runtime.perplexity import make_windows

        tokens = tokenize_corpus(tokenizer, load_text("jargon"), 102_400)
        self.short = make_windows(tokens, 1024, 102_400, windows)
        self.full = make_windows(tokens, 1024, 102_400, None)
        self.heldout = heldout

    def __call__(self, model, full: bool = False) -> dict:
        from procrustes_onnx.compiler.allocate import heldout_nll
        from procrustes_onnx.runtime.perplexity import evaluate_perplexity, torch_logits_fn

        t = time.perf_counter()
        ppl = evaluate_perplexity(torch_logits_fn(model), self.full if full else self.short, progress=False)
        out = {"ppl": ppl.ppl, "windows": ppl.windows, "heldout_nll": heldout_nll(model, self.heldout)}
        out["score_seconds"] = round(time.perf_counter() - t, 1)
        return out


def base_config(structure: str, calib: str):
    from procrustes_onnx.compiler.config import CompressionConfig

    return CompressionConfig(structure=structure, ratio=None, max_loss=0.1, calib_text=calib, rotation="global",
                             **SOLVER)


def phase_dense(args, emit) -> None:
    from procrustes_onnx.compiler.calibration import calibration_split
    from procrustes_onnx.compiler.checkpoint import load_model

    model, tok = load_model(args.model)
    _, held = calibration_split(tok, base_config("gs", args.calib))
    score = Scorer(tok, args.windows, held)
    emit({"row": "dense", "method": "dense", "removed_pct": 0.0, **score(model)})
    emit({"row": "dense@full", "method": "dense", "removed_pct": 0.0, **score(model, full=True)})


def phase_slicegpt(args, emit) -> None:
    from procrustes_onnx.compiler.calibration import calibration_split
    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.compiler.compress import count_params
    from procrustes_onnx.compiler.slicegpt import slice_model

    for ratio in args.ratios:
        model, tok = load_model(args.model)
        calib, held = calibration_split(tok, base_config("gs", args.calib))
        score = Scorer(tok, args.windows, held)
        t = time.perf_counter()
        report = slice_model(model, calib, ratio=ratio, original_params=count_params(model))
        row = {"row": f"slicegpt-{round(100 * ratio)}", "method": "slicegpt", "target": ratio,
               "removed_pct": round(100 * report["removed"], 3), "compress_seconds": round(time.perf_counter() - t, 1)}
        emit({**row, **score(model), "peak_rss_gib": _rss_gib()})
        if ratio in args.full:
            emit({**row, "row": row["row"] + "@full", **score(model, full=True)})


def phase_structured(structure: str, args, emit) -> None:
    import math

    import torch

    from procrustes_onnx.compiler.adapters import get_module
    from procrustes_onnx.compiler.allocate import (Ladder, Option, allocate, build_ladders, choice_after, greedy_steps,
                                                   heldout_nll, heldout_scorer, option_for, plan_curvature, plan_of,
                                                   search_max_loss, swap_in)
    from procrustes_onnx.compiler.calibration import calibration_split
    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.compiler.compress import count_params, plan_and_solve, plan_for_model, rotate_solved

    name = {"gs": "w-gs", "kron": "w-kron"}[structure]
    cfg = base_config(structure, args.calib)
    model, tok = load_model(args.model)
    original = count_params(model)
    calib, held = calibration_split(tok, cfg)
    score = Scorer(tok, args.windows, held)
    t0 = time.perf_counter()
    with torch.no_grad():
        work = Path(args.work) / name    # a rerun reuses the solved rotation kept here
        work.mkdir(parents=True, exist_ok=True)
        plan, _, _, rs, factors = plan_and_solve(model, cfg, original, calib, work, False, echo=lambda s: None)
        rotate_solved(model, rs, "global")
    solve_s = round(time.perf_counter() - t0, 1)
    print(f"{name}: rotation solved in {solve_s} s", flush=True)
    t = time.perf_counter()
    dense = {e.path: get_module(model, e.path) for e in plan.entries}
    c, g = plan_curvature(model, plan, calib, cfg.damp, progress=False)
    curvature_s = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    if structure in args.measured:
        ladders = build_ladders(model, plan, factors, c, g, kron_q=cfg.kron_q, progress=False)
    else:  # uniform rows only: each linear's dense option, nothing projected
        ladders = [Ladder(e.path, e.role, e.layer, e.shape, e.side, [Option(None, e.dense_params, 0.0)])
                   for e in plan.entries]
    steps = greedy_steps(ladders)
    ladder_s = round(time.perf_counter() - t, 1)
    print(f"{name}: curvature {curvature_s} s, ladder {ladder_s} s ({len(steps)} steps)", flush=True)
    dense_choice = [lad.options[0] for lad in ladders]
    dense_nll = heldout_nll(model, held)
    shared = {"solve_seconds": solve_s, "curvature_seconds": curvature_s, "ladder_seconds": ladder_s,
              "rotation_solved_at": cfg.plan_ratio, "dense_heldout_nll": dense_nll}

    def emit_choice(row: dict, choice: list[Option], full: bool) -> None:
        swap_in(model, ladders, choice, dense)
        p = plan_of(plan, ladders, choice)
        base = {**row, "params": p.promised_params, "removed_pct": round(100 * p.removed, 3), **shared}
        emit({**base, **score(model), "peak_rss_gib": _rss_gib()})
        if full:
            emit({**base, "row": row["row"] + "@full", **score(model, full=True)})

    for ratio in args.ratios:
        swap_in(model, ladders, dense_choice, dense)
        plan_r = plan_for_model(model, replace(cfg, max_loss=None, ratio=ratio, allocation="middle"), original)
        t = time.perf_counter()
        by_path = {e.path: e for e in plan_r.entries}
        uniform = [option_for(dense[lad.path].weight.detach().t(), c[lad.path], g[lad.path],
                              by_path[lad.path].spec, label="uniform") for lad in ladders]
        proj_s = round(time.perf_counter() - t, 1)
        pct = round(100 * ratio)
        emit_choice({"row": f"{name}-{pct}-uniform", "method": name, "allocation": "uniform", "target": ratio,
                     "projection_seconds": proj_s}, uniform, ratio in args.full)
        if structure in args.measured:
            choice, n = allocate(ladders, steps, sum(e.params for e in plan_r.entries))
            emit_choice({"row": f"{name}-{pct}-measured", "method": name, "allocation": "measured", "target": ratio,
                         "steps": n}, choice, ratio in args.full)
    if structure in args.measured:
        for max_loss in args.max_loss:
            probe = heldout_scorer(model, ladders, dense, held)
            limit = dense_nll + math.log1p(max_loss)
            n, nll, probes = search_max_loss(ladders, steps, limit, probe, echo=lambda s: print(s, flush=True))
            emit_choice({"row": f"{name}-maxloss-{max_loss:g}", "method": name, "allocation": "measured",
                         "max_loss": max_loss, "limit_nll": limit, "promised_heldout_ppl_ratio":
                         None if nll is None else math.exp(nll - dense_nll), "probes": probes, "steps": n},
                        choice_after(ladders, steps, n), args.full_max_loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--phases", default="dense,gs,slicegpt,kron")
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    ap.add_argument("--full", default="0.05,0.14", help="ratios also scored on the full protocol")
    ap.add_argument("--measured", default="gs", help="structures that get measured-allocation rows")
    ap.add_argument("--max-loss", default="0.05,0.1")
    ap.add_argument("--full-max-loss", action="store_true", help="score the --max-loss rows on the full protocol")
    ap.add_argument("--calib", default="mix")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/quality_curve_work")
    ap.add_argument("--out", default=str(ROOT / "docs/results/quality_curve.json"))
    args = ap.parse_args()
    args.ratios = [float(x) for x in args.ratios.split(",") if x]
    args.full = {float(x) for x in args.full.split(",") if x}
    args.max_loss = [float(x) for x in args.max_loss.split(",") if x]
    args.measured = set(args.measured.split(","))

    import torch

    from procrustes_onnx.core.environment import write_results

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows: list[dict] = json.loads(out.read_text()).get("rows", []) if out.exists() else []

    def emit(row: dict) -> None:
        rows[:] = [r for r in rows if r["row"] != row["row"]] + [row]
        dense = next((r for r in rows if r["row"] == "dense"), None)
        write_results(out, {"model": args.model, "calibration": f"{args.calib}, 16 x 512 tokens, seed 0",
                            "protocol": f"jargon 1024-token windows, first {args.windows} (rows @full: all 100)",
                            "solver": SOLVER, "threads": args.threads,
                            "dense_ppl": dense["ppl"] if dense else None, "rows": rows})
        print(json.dumps({k: v for k, v in row.items() if k != "probes"}), flush=True)

    for phase in args.phases.split(","):
        if phase:
            {"dense": phase_dense, "slicegpt": phase_slicegpt}.get(phase, lambda a, e: phase_structured(phase, a, e))(
                args, emit)
    print_table(rows)
    plot(out, rows)


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    dense = {r["windows"]: r["ppl"] for r in rows if r["method"] == "dense"}
    table = Table(title="SmolLM2-135M: Jargon PPL vs parameters removed")
    for col in ("row", "removed %", "windows", "PPL", "x dense", "held-out PPL x dense", "seconds"):
        table.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: (r["method"], r.get("allocation", ""), r["removed_pct"], r["windows"])):
        held = math.exp(r["heldout_nll"] - r["dense_heldout_nll"]) if "dense_heldout_nll" in r else None
        secs = r.get("compress_seconds", r.get("projection_seconds"))
        table.add_row(r["row"], f"{r['removed_pct']:.2f}", str(r["windows"]), f"{r['ppl']:,.2f}",
                      f"{r['ppl'] / dense[r['windows']]:.2f}" if r["windows"] in dense else "-",
                      f"{held:.3f}" if held else "-", "-" if secs is None else f"{secs:.0f}")
    Console(width=140).print(table)


def plot(out: Path, rows: list[dict]) -> None:
    """quality_curve.png next to the JSON (the report draws the same from the JSON)."""
    import sys

    sys.path.insert(0, str(ROOT))
    from procrustes_onnx.report import quality_curve_plot

    payload = json.loads(out.read_text())
    quality_curve_plot(out.parent, payload)


if __name__ == "__main__":
    main()
