"""Deployment benchmark: our artifacts (dense and compressed, fp32 / int8 / int4) against onnxruntime-genai's
model builder (int4 and fp32 of the same Hugging Face folder), measured in one run, one model at a time.

For every model: MB on disk, perplexity (Jargon protocol, the first --windows windows), prefill tok/s at 128
and 512 tokens and cached decode tok/s in plain ONNX Runtime (2 threads, median of repeats), decode tok/s in
onnxruntime-genai where the folder carries a genai_config.json, and peak RSS. Each model runs in its own
subprocess, so its peak RSS is its own.

    python benchmarks/deploy.py --artifact dense=artifacts/smollm2-135m-dense \\
        --artifact w-kron=artifacts/smollm2-135m-w-kron-20 --artifact w-gs=DIR --artifact slicegpt=DIR \\
        [--precisions fp32,int8,int4] [--windows 8] [--work /tmp/deploy] [--no-builder] [--fuse]

Writes docs/results/deploy.json and docs/results/deploy_size_ppl.png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from subprocess_worker import genai_decode_rates, run_worker

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def _pairs(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path, "model.onnx").is_file():
            sys.exit(f"error: --artifact wants name=FOLDER with a model.onnx, got {item!r}")
        out[name] = Path(path)
    return out


def _precision_folder(name: str, src: Path, precision: str, work: Path) -> Path:
    """The fp32 artifact itself, or its quantized copy in ``work`` (reused while its source is unchanged)."""
    from procrustes_onnx.core.artifacts import onnx_identity
    from procrustes_onnx.exporters.quantize import QuantizeConfig, quantize_artifact

    if precision == "fp32":
        return src
    out = work / f"{name}-{precision}"
    identity = onnx_identity(src) or {}
    done = out / "quantize.json"
    if done.is_file() and (onnx_identity(out) or {}).get("quantized_from") == identity.get("id"):
        return out
    quantize_artifact(src, out, QuantizeConfig(bits=int(precision[3:])), overwrite=True)
    return out


def _fused_folder(src: Path, work: Path, name: str) -> Path:
    from procrustes_onnx.exporters.fuse import fuse_artifact

    out = work / f"{name}-fused"
    if not (out / "fuse.json").is_file():
        fuse_artifact(src, out, overwrite=True)
    return out


def genai_decode(folder: Path, prompt: int, new_tokens: int) -> float | None:
    """Decode tok/s in onnxruntime-genai (greedy, random prompt ids): the faster of 2 runs; None without it."""
    rates = genai_decode_rates(folder, prompt, new_tokens, runs=2)
    return None if rates is None else max(rates)


def worker(folder: str, config: dict) -> None:
    """One model, in this process: size, perplexity, prefill, decode (ORT and genai), peak RSS."""
    import torch

    from procrustes_onnx.core.sources import load_tokenizer
    from procrustes_onnx.core.texts import load_text, tokenize_corpus
    from procrustes_onnx.runtime.benchmark import bytes_on_disk, measure_decode, measure_prefill, peak_rss_mib
    from procrustes_onnx.runtime.perplexity import evaluate_perplexity, make_windows
    from procrustes_onnx.runtime.perplexity_ort import ort_logits_fn
    from procrustes_onnx.runtime.session import OnnxCausalLM

    torch.set_num_threads(config["threads"])
    lm = OnnxCausalLM(folder, threads=config["threads"])
    result = {"bytes_on_disk": bytes_on_disk(lm.path)}
    if not config.get("skip_ppl"):
        tokens = tokenize_corpus(load_tokenizer(config["tokenizer"]), load_text("jargon"), 1024 * config["windows"])
        ppl = evaluate_perplexity(ort_logits_fn(lm), make_windows(tokens, 1024, None, config["windows"]), progress=False)
        result.update(ppl=ppl.ppl, ppl_windows=ppl.windows)
    result["prefill"] = [measure_prefill(lm, 1, s, config["repeats"]) for s in (128, 512)]
    result["decode"] = measure_decode(lm, 128, config["decode_tokens"], config["repeats"])
    del lm
    result["genai_decode_tokens_per_s"] = genai_decode(Path(folder), 128, config["decode_tokens"])
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))


def measure(folder: Path, config: dict) -> dict:
    return run_worker(__file__, folder, config)


def print_table(rows: dict) -> None:
    head = f"{'model':22} {'MB':>7} {'PPL':>9} {'pre128':>7} {'pre512':>7} {'dec ORT':>8} {'dec genai':>9} {'RSS MiB':>8}"
    print(head)
    print("-" * len(head))
    for name, m in rows.items():
        if "error" in m:
            print(f"{name:22} error: {m['error']}")
            continue
        genai = m.get("genai_decode_tokens_per_s")
        print(f"{name:22} {m['bytes_on_disk'] / 1e6:7.1f} {m['ppl']:9.2f} {m['prefill'][0]['tokens_per_s']:7.0f} "
              f"{m['prefill'][1]['tokens_per_s']:7.0f} {m['decode']['tokens_per_s']:8.1f} "
              f"{genai if genai is not None else float('nan'):9.1f} {m['peak_rss_mib']:8.0f}")


def plot(rows: dict, path: Path) -> Path:
    """MB on disk against PPL, every artifact and precision, the builder's int4 as the reference point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"fp32": "o", "int8": "s", "int4": "^"}
    for name, m in rows.items():
        if "error" in m:
            continue
        base, _, precision = name.rpartition(":")
        style = dict(marker=markers.get(precision, "o"), s=60)
        if base.startswith("builder"):
            style.update(color="k", marker="*", s=160)
        ax.scatter(m["bytes_on_disk"] / 1e6, m["ppl"], **style)
        ax.annotate(name, (m["bytes_on_disk"] / 1e6, m["ppl"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("MB on disk (model.onnx + data)")
    ax.set_ylabel("perplexity (Jargon, first windows)")
    ax.set_title("size vs perplexity: structure and weight-only quantization")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", action="append", default=[], help="name=FOLDER of an fp32 artifact")
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--work", default="/tmp/procrustes-deploy")
    parser.add_argument("--model", default="smollm2-135m", help="the Hugging Face model the builder converts")
    parser.add_argument("--no-builder", action="store_true")
    parser.add_argument("--fuse", action="store_true", help="also onnxscript's ORT fusions of each fp32 and int4")
    parser.add_argument("--out", default=str(RESULTS / "deploy.json"))
    parser.add_argument("--reuse-ppl", help="an earlier deploy.json: take each model's PPL from it (same folder) and "
                                            "time only, e.g. to re-time on a quieter machine")
    parser.add_argument("--worker")
    parser.add_argument("--worker-config")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.worker_config))
        return 0
    from procrustes_onnx.core.environment import write_results
    from procrustes_onnx.core.sources import resolve_model_dir
    from procrustes_onnx.reference import build_reference

    artifacts = _pairs(args.artifact)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = resolve_model_dir(args.model)
    config = {"windows": args.windows, "threads": args.threads, "repeats": args.repeats,
              "decode_tokens": args.decode_tokens, "tokenizer": str(hf_dir)}
    models: dict[str, Path] = {}
    for name, src in artifacts.items():
        for precision in args.precisions.split(","):
            models[f"{name}:{precision}"] = _precision_folder(name, src, precision, work)
            if args.fuse and precision in ("fp32", "int4"):
                fused = _fused_folder(src, work, name)
                models[f"{name}+fused:{precision}"] = _precision_folder(f"{name}+fused", fused, precision, work)
    if not args.no_builder:
        for precision in ("int4", "fp32"):
            folder = build_reference(hf_dir, work / f"builder-{precision}", precision)
            if folder is not None:
                models[f"builder:{precision}"] = folder
    earlier = json.loads(Path(args.reuse_ppl).read_text())["models"] if args.reuse_ppl else {}
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rows = {}
    for name, folder in models.items():
        start = time.perf_counter()
        old = earlier.get(name, {})
        reuse = old.get("folder") == str(folder) and "ppl" in old
        rows[name] = {"folder": str(folder), **measure(folder, {**config, "skip_ppl": reuse})}
        if reuse:
            rows[name].update(ppl=old["ppl"], ppl_windows=old["ppl_windows"], ppl_from=args.reuse_ppl)
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    print_table(rows)
    targets = _targets(rows)
    for line in targets["lines"]:
        print(line)
    plot_path = plot(rows, Path(args.out).with_name("deploy_size_ppl.png"))
    write_results(args.out, {"config": config, "models": rows, "targets": targets, "plot": str(plot_path),
                             "load_avg_at_end": os.getloadavg(),
                             "builder": "onnxruntime_genai.models.builder -p {int4,fp32} -e cpu"})
    print(f"wrote {args.out}")
    return 0


def _targets(rows: dict) -> dict:
    """The issue's targets, each as measured (None where a model is missing)."""
    def get(name: str, key: str):
        m = rows.get(name)
        if not m or "error" in m:
            return None
        return {"decode": m["decode"]["tokens_per_s"], "mb": m["bytes_on_disk"] / 1e6, "ppl": m["ppl"],
                "genai": m.get("genai_decode_tokens_per_s")}[key]

    out, lines = {}, []
    dense = get("dense:fp32", "decode")
    for v in ("w-kron", "w-gs", "slicegpt"):
        d = get(f"{v}:fp32", "decode")
        if dense and d:
            out[f"{v}_fp32_decode_over_dense"] = d / dense
            lines.append(f"{v} fp32 decode / dense fp32: {d / dense:.2f}x (target >= 1.2x)")
    ours, builder = get("dense:int4", "decode"), get("builder:int4", "decode")
    if ours and builder:
        out["dense_int4_decode_over_builder_int4"] = ours / builder
        lines.append(f"our dense int4 decode / builder int4 (plain ORT): {ours / builder:.2f}x (target >= 1x)")
    for v in ("w-kron", "w-gs", "slicegpt"):
        mb, dec, ppl = get(f"{v}:int4", "mb"), get(f"{v}:int4", "decode"), get(f"{v}:int4", "ppl")
        bmb, bdec, bppl = get("builder:int4", "mb"), get("builder:int4", "decode"), get("builder:int4", "ppl")
        if mb and bmb:
            out[f"{v}_int4_vs_builder_int4"] = {"size": mb / bmb, "decode": dec / bdec, "ppl": ppl / bppl}
            lines.append(f"{v} int4 vs builder int4: size {mb / bmb:.2f}x, decode {dec / bdec:.2f}x, "
                         f"PPL {ppl:.1f} vs {bppl:.1f}")
    return {**out, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
