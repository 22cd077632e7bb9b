"""ONNX Runtime benchmark of dense vs compressed SmolLM2 artifacts: prefill, cached decode, session time,
size, peak memory, each ratio beside the ideal (dense MACs / compressed MACs), and onnxscript's ORT fusions.

Each model is measured in its own subprocess (peak RSS is per model). The first model is the baseline.

    python benchmarks/runtime.py --models dense=out/dense kron=out/kron gs=out/gs [--fusions] [--quick]
    python benchmarks/runtime.py --export-dense --checkpoints kron=ckpt/kron slicegpt=ckpt/slice --quick

Writes docs/results/runtime.json and docs/results/runtime_{decode,prefill}.png, and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from procrustes_onnx.core.environment import cpu_model, package_versions
from subprocess_worker import run_worker

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
FULL = {"prefill": [(b, s) for b in (1, 4) for s in (128, 512, 1024)], "decode_tokens": 128, "repeats": 5}
QUICK = {"prefill": [(1, 128), (4, 128), (1, 512)], "decode_tokens": 32, "repeats": 2}


def machine() -> dict:
    return {"cores": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(),
            "load_avg_at_start": os.getloadavg()}


def versions() -> dict:
    return {**package_versions(("torch", "onnxruntime", "transformers", "onnx", "onnxscript")),
            "python": platform.python_version()}


def _pairs(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            sys.exit(f"error: expected name=path, got {item!r}")
        out[name] = path
    return out


def measure_in_subprocess(path: str, config: dict, timeout: int) -> dict:
    """Run `--worker` in a fresh interpreter (subprocess_worker.run_worker)."""
    return run_worker(__file__, path, config, timeout)


def worker(path: str, config: dict) -> None:
    from procrustes_onnx.runtime.benchmark import measure_model

    result = measure_model(path, prefill=[tuple(p) for p in config["prefill"]], decode_prompt=128,
                           decode_tokens=config["decode_tokens"], repeats=config["repeats"],
                           threads=config["threads"], device=config["device"])
    print(json.dumps(result))


def baseline_for(name: str, results: dict) -> str:
    """The first model is the baseline; a fused variant is compared with the fused baseline."""
    base = next(iter(results))
    return f"{base}+fused" if name.endswith("+fused") and f"{base}+fused" in results else base


def compare_all(results: dict) -> dict:
    out = {}
    for name, m in results.items():
        base = baseline_for(name, results)
        if name != base and "error" not in m and "error" not in results[base]:
            out[name] = {"baseline": base, **compare(results[base], m)}
    return out


def compare(base: dict, other: dict) -> dict:
    """Speed-ups of `other` over `base` beside the ideal MAC ratio."""
    ideal = base["macs"]["macs_per_token"] / other["macs"]["macs_per_token"]
    out = {"ideal_mac_ratio": ideal, "size_ratio": base["bytes_on_disk"] / other["bytes_on_disk"],
           "session_seconds_ratio": other["session_seconds"] / base["session_seconds"],
           "peak_rss_ratio": other["peak_rss_mib"] / base["peak_rss_mib"], "prefill_speedup": {}}
    for a, b in zip(base["prefill"], other["prefill"]):
        out["prefill_speedup"][f"b{a['batch']}_s{a['seq']}"] = a["seconds"] / b["seconds"]
    if base.get("decode") and other.get("decode"):
        speedup = other["decode"]["tokens_per_s"] / base["decode"]["tokens_per_s"]
        out["decode_speedup"] = speedup
        out["decode_speedup_over_ideal"] = speedup / ideal
    return out


def print_table(models: dict, comparisons: dict) -> None:
    head = f"{'model':16} {'MB':>7} {'MMAC/tok':>9} {'ideal':>6} {'sess s':>7} {'RSS MiB':>8} {'dec tok/s':>9} " \
           f"{'dec x':>6} {'x/ideal':>7}  prefill ms (b,s)"
    print(head)
    print("-" * len(head))
    for name, m in models.items():
        if "error" in m:
            print(f"{name:16} error: {m['error']}")
            continue
        c = comparisons.get(name, {})
        pre = "  ".join(f"{p['batch']},{p['seq']}:{1000 * p['seconds']:.0f}" for p in m["prefill"])
        dec = m["decode"]["tokens_per_s"] if m.get("decode") else float("nan")
        print(f"{name:16} {m['bytes_on_disk'] / 1e6:7.1f} {m['macs']['macs_per_token'] / 1e6:9.1f} "
              f"{c.get('ideal_mac_ratio', 1.0):6.2f} {m['session_seconds']:7.2f} {m['peak_rss_mib']:8.0f} {dec:9.1f} "
              f"{c.get('decode_speedup', 1.0):6.2f} {c.get('decode_speedup_over_ideal', 1.0):7.2f}  {pre}")


def plot(models: dict, comparisons: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: m for n, m in models.items() if "error" not in m and m.get("decode")}
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(ok)
    ax.bar(names, [ok[n]["decode"]["tokens_per_s"] for n in names], label="measured")
    ideal = [ok[c["baseline"]]["decode"]["tokens_per_s"] * c["ideal_mac_ratio"] if (c := comparisons.get(n))
             and c["baseline"] in ok else ok[n]["decode"]["tokens_per_s"] for n in names]
    ax.scatter(names, ideal, color="k", marker="_", s=600, label="ideal (baseline x MAC ratio)", zorder=3)
    ax.set_ylabel("decode tokens/s (128-token prompt, KV cache)")
    ax.set_title("ORT CPU decode")
    ax.legend()
    paths.append(_save(fig, out_dir / "runtime_decode.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.get_cmap("tab10")
    for i, (name, m) in enumerate(ok.items()):
        for j, batch in enumerate(sorted({p["batch"] for p in m["prefill"]})):
            pts = [(p["seq"], 1000 * p["seconds"]) for p in m["prefill"] if p["batch"] == batch]
            ax.plot(*zip(*pts), marker="o", color=colors(i % 10), linestyle=("-", "--", ":")[j % 3],
                    label=f"{name} b{batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill latency, ms (median)")
    ax.set_title("ORT CPU prefill")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "runtime_prefill.png"))
    return paths


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def _folder(path) -> str:
    path = Path(path)
    return str(path if path.is_dir() else path.parent)


def prepare_models(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """name -> artifact folder: given folders, plus exports of the dense model and of checkpoints."""
    models: dict[str, str] = {}
    if args.export_dense:
        from procrustes_onnx.exporters import export_model

        models["dense"] = _folder(export_model(args.model, work / "dense"))
    models |= _pairs(args.models)
    for name, ckpt in _pairs(args.checkpoints).items():
        from procrustes_onnx.exporters import export_compressed

        models[name] = _folder(export_compressed(ckpt, work / name))
    if not models:
        sys.exit("error: no models: pass --models name=folder ..., --checkpoints name=dir ... or --export-dense")
    return models


def agreement(folder: str, model_spec: str, windows: int, limit: int) -> dict:
    """The dense ONNX artifact against torch: PPL on Jargon windows and the local cloze tasks vs lm-eval's hf."""
    import time

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.core.texts import load_text, tokenize_corpus
    from procrustes_onnx.runtime.lm_eval_adapter import TASK_DIR, run_eval
    from procrustes_onnx.runtime.perplexity import evaluate_perplexity, make_windows, torch_logits_fn
    from procrustes_onnx.runtime.perplexity_ort import ort_logits_fn

    model, tokenizer = load_model(model_spec)
    size = min(1024, getattr(model.config, "max_position_embeddings", 1024))
    wins = make_windows(tokenize_corpus(tokenizer, load_text("jargon"), windows * size), size, windows * size)
    ref = evaluate_perplexity(torch_logits_fn(model), wins, progress=False)
    got = evaluate_perplexity(ort_logits_fn(folder), wins, progress=False)
    tasks = ["jargon_cloze", "kjv_cloze"]
    start = time.perf_counter()
    ours = run_eval(folder, tasks, limit=limit)["results"]
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), tasks=tasks,
                                     limit=limit, bootstrap_iters=0, task_manager=TaskManager(
                                         include_path=str(TASK_DIR), include_defaults=False))["results"]
    metrics = ("acc,none", "acc_norm,none")
    return {"onnx": folder, "ppl_windows": windows, "ppl_window": size, "torch_ppl": ref.ppl, "ort_ppl": got.ppl,
            "ppl_rel_diff": abs(got.ppl - ref.ppl) / ref.ppl, "lm_eval_limit": limit,
            "lm_eval": {t: {"onnx": {m: ours[t][m] for m in metrics}, "hf": {m: theirs[t][m] for m in metrics}}
                        for t in tasks},
            "lm_eval_seconds": {"onnx": ours_s, "hf": time.perf_counter() - start}}


def rerender(src: Path, out: Path) -> None:
    record = json.loads(src.read_text())
    record["comparisons"] = compare_all(record["models"])
    print_table(record["models"], record["comparisons"])
    record["plots"] = plot(record["models"], record["comparisons"], out.parent)
    _write_json(record, out)


def _write_json(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out)
    print(f"wrote {out} and {', '.join(record['plots'])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", help="name=artifact folder (or model.onnx); the first is the baseline")
    p.add_argument("--checkpoints", nargs="*", help="name=compressed checkpoint folder, exported + rewritten first")
    p.add_argument("--export-dense", action="store_true", help="export --model first and use it as the baseline")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--fusions", action="store_true", help="also time each model after onnxscript ort_fusions")
    p.add_argument("--quick", action="store_true", help=f"smaller grid: {QUICK}")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--work", default=None, help="folder for exported/fused models (default: a temp folder)")
    p.add_argument("--out", default=str(ROOT / "docs/results/runtime.json"))
    p.add_argument("--timeout", type=int, default=1800, help="seconds per model subprocess")
    p.add_argument("--from-json", help="re-render table, comparisons and plots from an earlier results file")
    p.add_argument("--agreement", metavar="FOLDER", help="only check this dense ONNX artifact against torch "
                   "(--model): PPL on 8 Jargon windows and lm-eval cloze tasks vs the hf model; adds to --out")
    p.add_argument("--agreement-limit", type=int, default=40)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, json.loads(args.worker_config))
    if args.device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            print("skipping: --device cuda needs onnxruntime-gpu (no CUDAExecutionProvider here)")
            return None
    if args.from_json:
        return rerender(Path(args.from_json), Path(args.out))
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if args.agreement:
        previous["agreement"] = agreement(args.agreement, args.model, 8, args.agreement_limit)
        print(json.dumps(previous["agreement"], indent=2))
        previous.setdefault("plots", [])
        return _write_json(previous, out)
    grid = QUICK if args.quick else FULL
    config = {**grid, "threads": args.threads, "device": args.device}
    work = Path(args.work or tempfile.mkdtemp(prefix="runtime-bench-"))
    from procrustes_onnx.runtime.benchmark import fusion_report, matmul_macs_per_token

    models = prepare_models(args, work)
    fusions = {}
    if args.fusions:
        for name, path in list(models.items()):
            fusions[name] = fusion_report(path, work / f"{name}+fused" / "model.onnx")
            if "path" in fusions[name]:
                models[f"{name}+fused"] = str(Path(fusions[name]["path"]).parent)
    results = {}
    for name, path in models.items():
        print(f"measuring {name} ({path}) ...", flush=True)
        results[name] = measure_in_subprocess(path, config, args.timeout)
        if "error" not in results[name]:
            results[name]["macs"] = matmul_macs_per_token(path)
    comparisons = compare_all(results)
    print_table(results, comparisons)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = plot(results, comparisons, out.parent)
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "versions": versions(), "mode": "quick" if args.quick else "full",
              "config": config, "baseline": next(iter(results)), "models": results, "comparisons": comparisons,
              "fusions": fusions, "plots": plots, "agreement": previous.get("agreement"),
              "notes": "median of `repeats` after one warm-up; decode = greedy steps with the KV cache after a "
                       "128-token prefill; ideal = dense MACs / compressed MACs over linear layers; peak RSS per "
                       "model subprocess (python + onnxruntime + model)"}
    _write_json(record, out)


if __name__ == "__main__":
    main()
