"""Streamed W-GS compression of a synthetic Llama of about 1.5B parameters, serially and on 2 Ray workers:
peak memory against the fp32 model's size, wall time, bytes written. Writes docs/results/scale.json.

The weights are random (normal, std 0.02; norms 1), written as one safetensors shard per decoder layer
without ever holding the model: memory and time do not depend on the values, quality does, so no quality
is reported. Each compression is a fresh process; its memory is sampled over its whole process tree (Ray's
raylet and workers included) and read from its own VmHWM. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from procrustes_onnx.core.environment import write_results
from procrustes_onnx.core.outputs import file_sha256

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def synthetic_llama(folder: Path, hidden: int, layers: int, intermediate: int, vocab: int, heads: int,
                    kv_heads: int, seed: int = 0) -> int:
    """A random Llama written shard by shard (one per decoder layer, one for the rest); returns its parameter
    count. Only one layer's tensors exist in memory at a time."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-5)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, (key, names) in enumerate(groups.items()):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: torch.ones(shapes[n]) if "norm" in n else torch.randn(shapes[n], generator=gen) * 0.02
                   for n in names}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        total += sum(t.numel() for t in tensors.values())
        weight_map.update({n: shard for n in names})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 4 * total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    return total


CHILD = """
import json, sys, time, torch
from procrustes_onnx.compiler.config import CompressionConfig
from procrustes_onnx.compiler.streamed import compress_streamed
folder, out, workers, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if {threads}:
    torch.set_num_threads({threads})
cfg = CompressionConfig(structure="gs", ratio=0.2, rotation="{rotation}", method="weighted", iterations={iterations},
                        rotation_iters={rotation_iters}, weighted_outer=1, calib_samples={samples},
                        calib_seq_len={seq_len}, stream=True, workers=workers)
calib = torch.randint(0, vocab, (({samples} + 4) * {seq_len},), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
compress_streamed(folder, None, cfg, out, echo=lambda s: print(s, file=sys.stderr, flush=True), calib_tokens=calib)
seconds = time.perf_counter() - start
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
print(json.dumps({{"seconds": round(seconds, 1), "driver_peak_kib": hwm}}))
"""


def _tree_rss_kib(root: int) -> int:
    """Resident memory of ``root`` and every descendant (shared pages counted once per process: an upper
    bound where Ray's object store maps the same pages into several workers)."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text().split()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        rss[int(entry)] = int(statm[1]) * PAGE_KIB
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return sum(rss.get(p, 0) for p in tree)


def _hwm_kib(pid: int) -> int:
    """A live process's peak resident memory (VmHWM), 0 once it is gone."""
    try:
        return int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM:")).split()[1])
    except (OSError, StopIteration):
        return 0


def run_sampled(argv: list[str], env: dict | None = None,
                watch: Callable[[int, float, int], None] | None = None) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run ``argv`` in a fresh process, sampling its process tree's resident memory every 0.25 s; returns the
    finished process (text stdout/stderr), its wall seconds and the tree's peak KiB. ``watch(pid, seconds,
    tree peak)`` runs at every sample (progress logging). The child's stderr goes to a file, not a pipe: a
    run of hours logs more than a pipe holds."""
    start = time.perf_counter()
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_kib(proc.pid))
        if watch is not None:
            watch(proc.pid, time.perf_counter() - start, peak)
        time.sleep(0.25)
    stdout, _ = proc.communicate()
    err.seek(0)
    done = subprocess.CompletedProcess(argv, proc.returncode, stdout, err.read())
    return done, round(time.perf_counter() - start, 1), peak


def _solved(out: Path) -> int:
    return len(list((out / "work").glob("pos*.safetensors")))


def progress_logger(log: Path, out: Path) -> Callable[[int, float, int], None]:
    """A `run_sampled` watcher appending one JSON line to ``log`` each time a position's solution lands in
    ``out/work``: seconds into this process, positions solved, the driver's VmHWM and the tree's peak so far.
    A run of hours that is cut short still shows how its peak moved with depth; a resumed run (same ``out``)
    appends a new segment."""
    seen = {"n": _solved(out)}
    segment = 1 + sum(1 for line in log.read_text().splitlines() if '"segment_start"' in line) if log.exists() else 1
    with log.open("a") as f:
        f.write(json.dumps({"segment_start": time.strftime("%Y-%m-%dT%H:%M:%S"), "segment": segment,
                            "positions_solved": seen["n"]}) + "\n")

    def watch(pid: int, seconds: float, tree_peak: int) -> None:
        n = _solved(out)
        if n > seen["n"]:  # the work folder goes once the checkpoint is written
            seen["n"] = n
            with log.open("a") as f:
                f.write(json.dumps({"segment": segment, "seconds": round(seconds, 1), "positions_solved": n,
                                    "driver_hwm_kib": _hwm_kib(pid), "tree_peak_kib": tree_peak}) + "\n")
    return watch


def progress_summary(log: Path, positions: int) -> dict:
    """What a progress log (`progress_logger`) shows, for a run cut short as well as a finished one: each
    segment's solved positions, seconds and peaks, and the per-position trace of the driver's VmHWM."""
    segments: dict[int, dict] = {}
    trace = []
    for line in log.read_text().splitlines():
        row = json.loads(line)
        seg = segments.setdefault(row["segment"], {"segment": row["segment"], "seconds": 0.0, "driver_hwm_kib": 0,
                                                   "tree_peak_kib": 0})
        if "segment_start" in row:
            seg.update(started=row["segment_start"], positions_at_start=row["positions_solved"])
            continue
        seg.update(seconds=row["seconds"], positions_solved=row["positions_solved"],
                   driver_hwm_kib=max(seg["driver_hwm_kib"], row["driver_hwm_kib"]),
                   tree_peak_kib=max(seg["tree_peak_kib"], row["tree_peak_kib"] or 0))  # None: not sampled
        trace.append([row["segment"], row["positions_solved"], row["seconds"], row["driver_hwm_kib"]])
    done = max((t[1] for t in trace), default=0)
    return {"positions": positions, "positions_solved": done, "finished": done >= positions,
            "segments": list(segments.values()), "trace [segment, positions solved, seconds, driver VmHWM KiB]": trace,
            "driver_hwm_kib": max((s["driver_hwm_kib"] for s in segments.values()), default=0)}


def compress_once(folder: Path, out: Path, workers: int, vocab: int, solver: dict, log: Path | None = None) -> dict:
    """One streamed compression in a fresh process; wall time, peaks, bytes written. With ``log``, progress lines
    (`progress_logger`); an ``out`` left by a cut run is resumed (its solved positions are reused)."""
    code = CHILD.format(**solver)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    resumed_from = _solved(out) if out.exists() else 0
    watch = progress_logger(log, out) if log is not None else None
    done, seconds, peak = run_sampled([sys.executable, "-c", code, str(folder), str(out), str(workers), str(vocab)],
                                      env, watch)
    if done.returncode:
        raise SystemExit(f"error: the compression with {workers} worker(s) failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and "work" not in p.parts)
    return {"workers": workers, "wall_seconds": seconds, **row, "tree_peak_kib": peak, "bytes_written": written,
            "resumed_from_positions": resumed_from}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--workers", default="1,2", help="worker counts to time, one fresh process each")
    ap.add_argument("--iterations", type=int, default=1, help="Frobenius ALS iterations (the main job: 10)")
    ap.add_argument("--rotation-iters", type=int, default=2, help="Riemannian steps per solve (the main job: 50)")
    ap.add_argument("--rotation", choices=("per-position", "global"), default="per-position",
                    help="global: one rotation, streamed as a gathering pass, an out-of-core solve and a writing pass")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the compressing process (0: torch's "
                    "default); a streamed global solve projects that many terms side by side")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--work", default=None, help="parent of the temporary folder for the model and checkpoints")
    ap.add_argument("--keep", default=None, help="a folder that keeps the model, the checkpoints and progress logs "
                    "(progress<workers>.jsonl) after the run; a run cut short resumes from it")
    ap.add_argument("--out", default="docs/results/scale.json")
    ap.add_argument("--summarize", action="store_true", help="print what the --keep folder's progress logs show "
                    "(a run cut short too) as JSON, and run nothing")
    args = ap.parse_args()
    if args.summarize:
        for log in sorted(Path(args.keep).glob("progress*.jsonl")):
            print(json.dumps({log.name: progress_summary(log, 2 * args.layers + 1)}, indent=1))
        return
    solver = {"iterations": args.iterations, "rotation_iters": args.rotation_iters, "samples": args.samples,
              "seq_len": args.seq_len, "rotation": args.rotation, "threads": args.threads}
    with contextlib.ExitStack() as stack:
        root = Path(args.keep) if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.work)))
        t = time.perf_counter()
        shape = [args.hidden, args.layers, args.intermediate, args.vocab, args.heads, args.kv_heads]
        params = kept_llama(root / "model", shape) if args.keep else None
        if params is None:
            params = synthetic_llama(root / "model", *shape)
            (root / "model" / "shape.json").write_text(json.dumps({"shape": shape, "parameters": params}))
        fp32_kib = 4 * params // 1024
        print(f"synthetic Llama: {params / 1e9:.2f}B parameters, {fp32_kib / 2**20:.2f} GiB fp32, written in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            log = root / f"progress{workers}.jsonl" if args.keep else None
            row = compress_once(root / "model", root / f"ck{workers}", workers, args.vocab, solver, log)
            if log is not None:  # a resumed run: every segment's time and peak, not only this process's
                row["progress"] = {**progress_summary(log, 2 * args.layers + 1), "finished": True}  # it returned 0
            row["driver_peak_over_fp32"] = round(row["driver_peak_kib"] / fp32_kib, 3)
            row["tree_peak_over_fp32"] = round(row["tree_peak_kib"] / fp32_kib, 3)
            row["model_sha256"] = file_sha256(root / f"ck{workers}" / "model.safetensors")
            row["same_tensors_as_first"] = row["model_sha256"] == (rows[0] if rows else row)["model_sha256"]
            rows.append(row)
            print(row, flush=True)
    print_table(rows, fp32_kib)
    write_results(args.out, {"benchmark": "scale", "model": {
        "parameters": params, "fp32_gib": round(fp32_kib / 2**20, 3), "hidden": args.hidden, "layers": args.layers,
        "intermediate": args.intermediate, "vocab": args.vocab, "heads": args.heads, "kv_heads": args.kv_heads,
        "weights": "random normal(0, 0.02), norms 1: memory and time only"},
        "compression": {"structure": "gs", "ratio": 0.2, "method": "weighted", "stream": True, **solver},
        "rows": rows})


def kept_llama(folder: Path, shape: list[int]) -> int | None:
    """The parameter count of a synthetic model a previous ``--keep`` run wrote in ``folder`` with this shape, or
    None (then it is written again)."""
    try:
        record = json.loads((folder / "shape.json").read_text())
    except (OSError, ValueError):
        return None
    return record["parameters"] if record.get("shape") == shape else None


def print_table(rows: list[dict], fp32_kib: int) -> None:
    print(f"\n| workers | wall s | driver peak GiB | tree peak GiB | driver peak / fp32 ({fp32_kib / 2**20:.2f} GiB) "
          "| written GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['wall_seconds']} | {r['driver_peak_kib'] / 2**20:.2f} | "
              f"{r['tree_peak_kib'] / 2**20:.2f} | {r['driver_peak_over_fp32']} | {r['bytes_written'] / 2**30:.2f} |")


if __name__ == "__main__":
    main()
