"""Fused GroupQueryAttention (`--attention gqa`) against the unfused export, on SmolLM2-135M dense, fp32 and int4.

For each model: decode tok/s after a 128-token prompt, 128 new tokens, 2 threads, median of 3, in plain ONNX
Runtime (runtime.benchmark.measure_decode) and in onnxruntime-genai where installed; nodes run per decode step
(ORT profiler, benchmarks/decode_profile.py); the logits' relative error of the fused fp32 graph against the
unfused one. Each model is measured in its own subprocess, one at a time; the exports are cached in --work.

    flock /tmp/heavy.lock python benchmarks/deploy_gqa.py [--work /tmp/procrustes-gqa] [--fuse] [--builder]

--fuse adds the gqa graph with onnxscript's RMSNorm/SkipRMSNorm fusions (exporters/fuse.py); --builder adds
onnxruntime-genai's model builder int4 of the same Hugging Face folder. Every int4 is quantized twice: with the
sibling MatMuls packed (q/k/v, gate/up: exporters/pack.py, the default of `quantize`) and without
(``:int4-unpacked``). ``--structured NAME=CHECKPOINT,...`` adds compressed checkpoints, exported with gqa
attention, fp32 and int4 packed.

Writes docs/results/deploy_gqa.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from subprocess_worker import genai_decode_rates, run_worker  # noqa: E402


def prepare(work: Path, model: str, fuse: bool, structured: dict[str, str] | None = None) -> dict[str, Path]:
    """fp32 exports (unfused, gqa, optionally gqa + ORT norm fusions, compressed checkpoints with gqa) and their
    int4 copies (packed, and unpacked for the dense ones), reused if present."""
    from procrustes_onnx.exporters.fuse import fuse_artifact
    from procrustes_onnx.exporters.pipeline import export_compressed, export_model
    from procrustes_onnx.exporters.quantize import QuantizeConfig, quantize_artifact

    fp32 = {}
    for attention in ("unfused", "gqa"):
        out = work / f"dense-{attention}"
        if not (out / "export.json").is_file():
            export_model(model, out, attention=attention)
        fp32[attention] = out
    if fuse:
        out = work / "dense-gqa+fused"
        if not (out / "fuse.json").is_file():
            fuse_artifact(fp32["gqa"], out)
        fp32["gqa+fused"] = out
    for name, checkpoint in (structured or {}).items():
        out = work / name
        if not (out / "rewrite.json").is_file():
            export_compressed(checkpoint, out, attention="gqa")
        fp32[name] = out
    models = {}
    for name, src in fp32.items():
        models[f"{name}:fp32"] = src
        for suffix, pack in (("int4", True), ("int4-unpacked", False)):
            if not pack and name in (structured or {}):
                continue
            q = work / f"{src.name}-{suffix}"
            if not (q / "quantize.json").is_file() or \
                    bool(json.loads((q / "quantize.json").read_text()).get("packed")) != pack:
                quantize_artifact(src, q, QuantizeConfig(bits=4, pack=pack), overwrite=True)
            models[f"{name}:{suffix}"] = q
    return models


def genai_decode(folder: Path, prompt: int, new_tokens: int, repeats: int, share: bool | None = None) -> float | None:
    """Decode tok/s in onnxruntime-genai (greedy, random prompt), median of ``repeats`` after a warm-up run; None
    without it. ``share`` overrides the folder's past_present_share_buffer."""
    rates = genai_decode_rates(folder, prompt, new_tokens, runs=repeats + 1, share=share)
    return None if rates is None else statistics.median(rates[1:])


def worker(folder: str, config: dict) -> None:
    """One model in this process: plain-ORT decode, genai decode, nodes per decode step."""
    import torch

    from decode_profile import profile
    from procrustes_onnx.runtime.benchmark import bytes_on_disk, measure_decode
    from procrustes_onnx.runtime.session import OnnxCausalLM

    torch.set_num_threads(config["threads"])
    lm = OnnxCausalLM(folder, threads=config["threads"])
    result = {"bytes_on_disk": bytes_on_disk(lm.path), "attention": lm.attention}
    result["decode"] = measure_decode(lm, 128, config["decode_tokens"], config["repeats"])
    del lm
    shared = True if result["attention"] == "gqa" else None  # what genai_config.json says today
    result["genai_decode_tokens_per_s"] = genai_decode(Path(folder), 128, config["decode_tokens"], config["repeats"],
                                                       share=shared)
    if result["attention"] == "gqa" and config.get("unshared", True):  # the growing cache too, for comparison
        result["genai_decode_unshared_tokens_per_s"] = genai_decode(Path(folder), 128, config["decode_tokens"],
                                                                    config["repeats"], share=False)
    if config.get("profile", True):
        prof = profile(folder, 16, config["threads"])
        result["nodes_per_step"] = prof["nodes_per_step"]
        result["share_by_op"] = {k: round(v, 4) for k, v in list(prof["share_by_op"].items())[:8]}
    print(json.dumps(result))


def measure(folder: Path, config: dict) -> dict:
    return run_worker(__file__, folder, config)


def _combine(runs: list[dict]) -> dict:
    """One row from the rounds: the first round's fields, speeds replaced by their median over rounds."""
    row = {**runs[0], "rounds": len(runs)}
    for key in ("genai_decode_tokens_per_s", "genai_decode_unshared_tokens_per_s"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row[key], row[f"{key}_rounds"] = statistics.median(values), values
    rates = [r["decode"]["tokens_per_s"] for r in runs if "decode" in r]
    if rates:
        row["decode"] = {**runs[0]["decode"], "tokens_per_s": statistics.median(rates), "tokens_per_s_rounds": rates}
    return row


def exactness(models: dict[str, Path]) -> dict:
    """Relative error of the fused fp32 logits against the unfused fp32 graph's, on a fixed prompt."""
    import numpy as np

    from procrustes_onnx.exporters.pipeline import compare_logits

    ids = (np.arange(1, 65, dtype=np.int64) * 7919 % 49152)[None]
    if "unfused:fp32" not in models:
        return {}
    return {name: compare_logits(models["unfused:fp32"] / "model.onnx", folder / "model.onnx", ids)
            for name, folder in models.items() if name in ("gqa:fp32", "gqa+fused:fp32")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", default="/tmp/procrustes-gqa")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="decode runs per model per round (median)")
    parser.add_argument("--rounds", type=int, default=1, help="passes over all models, interleaved (median)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--fuse", action="store_true", help="also the gqa graph with onnxscript's ORT norm fusions")
    parser.add_argument("--builder", action="store_true",
                        help="also onnxruntime-genai's model builder int4 of the same folder (the anchor)")
    parser.add_argument("--structured", default="",
                        help="NAME=CHECKPOINT,... compressed checkpoints to add (gqa, fp32 and int4 packed)")
    parser.add_argument("--only", default="", help="comma-separated model names to time (default: all)")
    parser.add_argument("--no-unshared", action="store_true",
                        help="skip genai's decode with the growing (unshared) cache (measured since 2026-12-04)")
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "deploy_gqa.json"))
    parser.add_argument("--worker")
    parser.add_argument("--worker-config")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.worker_config))
        return 0
    from procrustes_onnx.core.environment import write_results
    from procrustes_onnx.core.sources import resolve_model_dir

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    structured = dict(item.split("=", 1) for item in args.structured.split(",") if item)
    models = prepare(work, str(resolve_model_dir(args.model)), args.fuse, structured)
    if args.builder:
        from procrustes_onnx.reference import build_reference

        folder = build_reference(resolve_model_dir(args.model), work / "builder-int4", "int4")
        if folder is not None:
            models["builder:int4"] = folder
    if args.only:
        models = {k: v for k, v in models.items() if k in args.only.split(",")}
    if args.prepare_only:
        print("\n".join(f"{k}: {v}" for k, v in models.items()))
        return 0
    errors = exactness(models)
    config = {"threads": args.threads, "repeats": args.repeats, "rounds": args.rounds,
              "decode_tokens": args.decode_tokens, "prompt": 128, "unshared": not args.no_unshared}
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}", flush=True)
    rounds: dict[str, list[dict]] = {name: [] for name in models}
    for i in range(args.rounds):  # models interleaved, so drifting load on a shared machine hits all alike
        for name, folder in models.items():
            r = measure(folder, {**config, "profile": i == 0})
            rounds[name].append(r)
            print(f"round {i} {name:18s} ORT {r.get('decode', {}).get('tokens_per_s', float('nan')):6.1f} tok/s  "
                  f"genai {r.get('genai_decode_tokens_per_s') or float('nan'):6.1f} tok/s  "
                  f"nodes/step {r.get('nodes_per_step')}  {r.get('error', '')}", flush=True)
    rows = {name: {"folder": str(models[name]), **_combine(runs)} for name, runs in rounds.items()}
    earlier = []
    if Path(args.out).is_file():  # keep every earlier run's speeds: this machine is shared and noisy
        old = json.loads(Path(args.out).read_text())
        earlier = old.get("earlier_runs", []) + [{k: old.get(k) for k in ("date", "load_avg_at_start",
                                                                             "load_avg_at_end", "models")}]
    write_results(args.out, {"config": config, "models": rows, "fp32_logits_vs_unfused": errors,
                             "load_avg_at_start": load_start, "load_avg_at_end": os.getloadavg(),
                             "model": args.model, "earlier_runs": earlier})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
