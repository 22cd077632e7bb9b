"""Speed of one structured linear vs dense: ONNX Runtime CPU and torch, SmolLM2 and Llama-2-7B shapes.

For each shape, kept fraction (3/4, 5/8, 1/2) and token count T, times y = x @ W for x [1, T, in]
(dense, Kronecker, GS; factors random, shapes from ops.planner) and reports the speed-up over dense,
the ideal speed-up (dense MACs / structured MACs) and their ratio. Prints a table and writes
docs/results/structured_linear.json.

    python benchmarks/structured_linear.py            # full grid (several minutes on 2 cores)
    python benchmarks/structured_linear.py --quick    # smoke check: two shapes, T in {1, 512}
    python benchmarks/structured_linear.py --profile kron --shape 576x1536:in --tokens 512
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from procrustes_onnx.core.environment import cpu_model, package_versions
from procrustes_onnx.ops import structured_from_spec
from procrustes_onnx.ops.lowering import standalone_model
from procrustes_onnx.ops.planner import plan_matrix, plan_dense

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "structured_linear.json"
SHAPES = {  # name -> (in, out, rotated side)
    "smol q/o 576x576": (576, 576, "in"), "smol o 576x576": (576, 576, "out"), "smol k/v 576x192": (576, 192, "in"),
    "smol gate/up 576x1536": (576, 1536, "in"), "smol down 1536x576": (1536, 576, "out"),
    "7b q 4096x4096": (4096, 4096, "in"), "7b gate 4096x11008": (4096, 11008, "in"),
}
QUICK_SHAPES = ["smol q/o 576x576", "smol gate/up 576x1536"]
TOKENS, QUICK_TOKENS = (1, 16, 128, 512, 2048), (1, 512)
KEPT, QUICK_KEPT = ("3/4", "5/8", "1/2"), ("3/4",)
THREADS = 2  # the brief's setting; --threads overrides it (a loaded machine favours 1)


def set_threads(n: int) -> None:
    global THREADS
    THREADS = n
    torch.set_num_threads(n)


def machine() -> dict:
    return {"cores": os.cpu_count(), "cpu": cpu_model(), "threads": THREADS, "load_avg_start": os.getloadavg()}


def versions() -> dict:
    return package_versions(("torch", "onnxruntime", "transformers", "onnx", "onnx_ir", "numpy"))


def bench(fn, budget_s: float, min_reps: int = 3, max_reps: int = 200) -> float:
    """Median seconds of fn() after one warm-up call, repeating until the time budget is spent
    (a single timed call when the warm-up alone exceeded the budget: the 7B shapes at large T)."""
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > budget_s:
        min_reps = 1
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ort_session(spec: dict, factors: dict, profile_dir: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_dir:
        opts.enable_profiling, opts.profile_file_prefix = True, os.path.join(profile_dir, "ort")
    model = standalone_model(spec, factors, lead=2)
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])


def make(spec: dict, seed: int = 0):
    """A structured matrix of `spec` with random factors (speed does not depend on values)."""
    g = torch.Generator().manual_seed(seed)
    mat = structured_from_spec(spec)
    with torch.no_grad():
        for p in mat.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-2] ** 0.5)
    return mat.eval()


def run_cell(spec: dict, tokens_list, budget: float) -> dict[int, dict]:
    mat = make(spec)
    factors = {k: v.detach().numpy() for k, v in mat.factors().items()}
    sess = ort_session(spec, factors)
    out = {}
    for t in tokens_list:
        x = np.random.default_rng(t).standard_normal((1, t, spec["in"])).astype(np.float32)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            t_torch = bench(lambda: mat(xt), budget)
        t_ort = bench(lambda: sess.run(None, {"x": x}), budget)
        out[t] = {"ort_s": t_ort, "torch_s": t_torch, "macs": mat.macs(t), "params": mat.num_params}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, T in {1, 512}, 3/4 only, short budgets")
    ap.add_argument("--budget", type=float, default=None, help="seconds of repeats per cell (default 0.5, quick 0.15)")
    ap.add_argument("--profile", choices=["dense", "kron", "gs"], help="ORT-profile one lowering and print op times")
    ap.add_argument("--shape", default="576x1536:in", help="IN x OUT:SIDE for --profile")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--kept", default="3/4")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=THREADS, help="ORT intra-op and torch threads")
    ap.add_argument("--shapes", help="comma-separated subset of: " + ", ".join(SHAPES))
    args = ap.parse_args()
    set_threads(args.threads)
    if args.profile:
        return profile(args)
    shapes = args.shapes.split(",") if args.shapes else QUICK_SHAPES if args.quick else list(SHAPES)
    tokens, kepts = (QUICK_TOKENS, QUICK_KEPT) if args.quick else (TOKENS, KEPT)
    budget = args.budget or (0.15 if args.quick else 0.5)
    info, rows = machine(), []
    for name in shapes:
        n_in, n_out, side = SHAPES[name]
        dense = run_cell(plan_dense(n_in, n_out).spec, tokens, budget)
        for kept in kepts:
            for kind, plan in plan_matrix(n_in, n_out, side, kept).items():
                res = run_cell(plan.spec, tokens, budget)
                for t in tokens:
                    d, s = dense[t], res[t]
                    ideal = d["macs"] / s["macs"]
                    row = {"shape": name, "in": n_in, "out": n_out, "rotated": side, "kept": kept, "kind": kind,
                           "spec": plan.spec, "params_kept": plan.kept, "tokens": t, "ideal": ideal,
                           "dense_ort_ms": 1e3 * d["ort_s"], "ort_ms": 1e3 * s["ort_s"],
                           "dense_torch_ms": 1e3 * d["torch_s"], "torch_ms": 1e3 * s["torch_s"]}
                    row["ort_speedup"] = d["ort_s"] / s["ort_s"]
                    row["torch_speedup"] = d["torch_s"] / s["torch_s"]
                    row["ort_vs_ideal"] = row["ort_speedup"] / ideal
                    row["torch_vs_ideal"] = row["torch_speedup"] / ideal
                    rows.append(row)
                    print_row(row, header=len(rows) == 1)
    summarize(rows)
    info["load_avg_end"] = os.getloadavg()
    info["shared"] = max(info["load_avg_start"][0], info["load_avg_end"][0]) > 1.5 * THREADS
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": info,
           "versions": versions(), "quick": args.quick, "budget_s": budget,
           "ort_session": {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1,
                           "graph_optimization_level": "ORT_ENABLE_ALL", "provider": "CPUExecutionProvider"},
           "input": "x [1, T, in] float32; median of repeats after one warm-up", "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(fh.name, args.out)
    print(f"\nwrote {args.out} (machine shared: {info['shared']}, load {info['load_avg_start'][0]:.1f}"
          f" -> {info['load_avg_end'][0]:.1f})")


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'shape':22} {'kept':4} {'kind':5} {'T':>5} {'ideal':>6} | {'ort ms':>8} {'dense':>8} {'x':>6} "
              f"{'/ideal':>6} | {'torch ms':>8} {'dense':>8} {'x':>6} {'/ideal':>6}")
    print(f"{r['shape']:22} {r['kept']:4} {r['kind']:5} {r['tokens']:5d} {r['ideal']:6.2f} | {r['ort_ms']:8.3f} "
          f"{r['dense_ort_ms']:8.3f} {r['ort_speedup']:6.2f} {r['ort_vs_ideal']:6.2f} | {r['torch_ms']:8.3f} "
          f"{r['dense_torch_ms']:8.3f} {r['torch_speedup']:6.2f} {r['torch_vs_ideal']:6.2f}", flush=True)


def summarize(rows: list[dict]) -> None:
    """Median ORT speed-up / ideal per kind and T, and how many cells reach the 0.8 target."""
    print("\nORT speed-up / ideal (target >= 0.8):")
    for kind in ("kron", "gs"):
        for t in sorted({r["tokens"] for r in rows}):
            v = [r["ort_vs_ideal"] for r in rows if r["kind"] == kind and r["tokens"] == t]
            if v:
                print(f"  {kind:4} T={t:<5d} median {statistics.median(v):.2f}  min {min(v):.2f}  "
                      f">= 0.8 in {sum(x >= 0.8 for x in v)}/{len(v)}")


def profile(args) -> None:
    """ORT per-op time for one lowering (what limits it: GEMMs vs Transposes vs overhead)."""
    dims, side = args.shape.split(":")
    n_in, n_out = (int(v) for v in dims.split("x"))
    plan = plan_dense(n_in, n_out) if args.profile == "dense" else plan_matrix(n_in, n_out, side, args.kept)[args.profile]
    mat = make(plan.spec)
    x = np.random.default_rng(0).standard_normal((1, args.tokens, n_in)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(plan.spec, {k: v.detach().numpy() for k, v in mat.factors().items()}, tmp)
        for _ in range(50):
            sess.run(None, {"x": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per.setdefault(e["name"].removesuffix("_kernel_time"), []).append(e["dur"])
    print(plan.describe(), f"T={args.tokens}")
    total = sum(statistics.median(v) for v in per.values())
    for name, durs in sorted(per.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"  {statistics.median(durs):9.1f} us  {100 * statistics.median(durs) / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
