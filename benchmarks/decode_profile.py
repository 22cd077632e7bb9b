"""Where decode time goes: ONNX Runtime's profiler over cached decode steps, summed by op type.

Shares of node time are what this reports (they hold on a loaded machine better than absolute times do), plus
node counts per step; the builder's model beside ours shows what fusion buys.

    python benchmarks/decode_profile.py name=FOLDER [name=FOLDER ...] [--steps 32] [--threads 2]

Writes docs/results/decode_profile.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def profile(folder: str, steps: int, threads: int) -> dict:
    import onnxruntime as ort

    from procrustes_onnx.runtime.session import OnnxCausalLM

    lm = OnnxCausalLM(folder, threads=threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    options.log_severity_level = 3
    lm.session = ort.InferenceSession(str(lm.path), sess_options=options, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 256, size=(1, 128))
    logits, cache = lm.prefill(ids)
    runs_before = 1
    for _ in range(steps):
        logits, cache = lm.decode_step(logits.argmax(-1), cache)
    events = json.loads(Path(lm.session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    nodes_per_run: dict[int, int] = defaultdict(int)
    run_index, total = -1, 0.0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            run_index += 1
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if run_index < runs_before:  # the prefill's nodes are not decode time
            continue
        op = e.get("args", {}).get("op_name", "?")
        per_op[op] += e["dur"]
        total += e["dur"]
        nodes_per_run[run_index] += 1
    counts = list(nodes_per_run.values())
    return {"node_us_per_step": total / steps, "nodes_per_step": int(np.median(counts)) if counts else 0,
            "share_by_op": {k: v / total for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="name=FOLDER")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "decode_profile.json"))
    args = parser.parse_args()
    from procrustes_onnx.core.environment import write_results

    rows = {}
    for item in args.models:
        name, _, folder = item.partition("=")
        if not folder:
            sys.exit(f"error: expected name=FOLDER, got {item!r}")
        rows[name] = profile(folder, args.steps, args.threads)
    print(f"{'model':20} {'nodes/step':>10} {'node us/step':>12}  top ops by share of node time")
    for name, r in rows.items():
        top = ", ".join(f"{op} {100 * s:.0f}%" for op, s in list(r["share_by_op"].items())[:6])
        print(f"{name:20} {r['nodes_per_step']:10d} {r['node_us_per_step']:12.0f}  {top}")
    write_results(args.out, {"steps": args.steps, "threads": args.threads, "load_avg": os.getloadavg(), "models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
