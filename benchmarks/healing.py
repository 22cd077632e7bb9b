"""Healing on SmolLM2 at 20% removed: PPL on Jargon windows after N healing tokens, per variant and mode.

Points are ``<variant>:<mode>:<tokens>`` (variant w-gs, w-kron or slicegpt; mode blockwise or e2e; tokens
0 for the training-free checkpoint). Each point heals the training-free checkpoint from scratch in its own
subprocess (clean peak memory, the learning-rate schedule sized for its own budget) and is appended to the
JSON as soon as it finishes, so the grid can be stopped and continued with --resume. Training-free
checkpoints are made once with the main job's settings (16 x 512 tokens of the default calibration text,
10 iterations, 50 rotation steps, the variant's allocation) into --checkpoints, in a folder named by
calibration text and allocation; a row records which checkpoint it healed, and --resume skips a point only
if it was measured on the same checkpoint. PPL: --windows Jargon windows (the protocol's first N; 100 = the full protocol).
A point id may end in ``@full`` to score it on the full protocol. A plot (log-log PPL vs tokens) is written
next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from subprocess_worker import run_one

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
DENSE_PPL = {4: 29.89, 100: 32.51}
#: a log-log slope flatter than this is a plateau: its extrapolated token counts are not reported
PLATEAU_SLOPE = 0.05


def checkpoint_config(variant: str):
    """The compression config of ``variant`` at 20% removed, with the main job's solver settings."""
    from procrustes_onnx.stages.compress import compression_config
    from procrustes_onnx.pipeline_options import RUN_SOLVER, RunOptions

    solver = dict(RUN_SOLVER)
    opts = RunOptions(calib_samples=solver.pop("calib_samples"), calib_seq_len=solver.pop("calib_seq_len"),
                      iterations=solver.pop("iterations"), solver=solver)
    return compression_config(opts, variant)


def ensure_checkpoint(variant: str, folder: Path) -> Path:
    """The training-free checkpoint of ``variant`` (made once into ``folder``)."""
    from procrustes_onnx.core.sources import resolve_model_dir
    from procrustes_onnx.stages.compress import compress_folder

    config = checkpoint_config(variant)
    out = folder / checkpoint_name(variant, config.to_dict())
    if not (out / "structure.json").is_file():
        compress_folder(resolve_model_dir("smollm2-135m"), config, out)
    return out


def checkpoint_name(variant: str, config: dict) -> str:
    """The folder of a variant's training-free checkpoint: its calibration text and allocation are in the
    name, so checkpoints made under older defaults (KJV, uniform shares) are never silently reused."""
    allocation = config.get("allocation") if config.get("method") != "slicegpt" else None
    return "-".join([variant, "20", str(config.get("calib_text"))] + ([allocation] if allocation else []))


def run_point(point: str, args: argparse.Namespace) -> dict:
    """Heal (unless 0 tokens) and score one point; runs inside the point's subprocess."""
    import torch

    from procrustes_onnx.compiler.checkpoint import load_compressed
    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.compiler.heal import HealConfig, heal_model
    from procrustes_onnx.core.sources import cache_root
    from procrustes_onnx.core.texts import load_text, tokenize_corpus
    from procrustes_onnx.runtime.perplexity import evaluate_perplexity, make_windows, torch_logits_fn

    spec, _, full = point.partition("@")
    torch.set_num_threads(args.threads)
    if spec == "dense":  # the reference on the same windows
        teacher, tokenizer = load_model("smollm2-135m")
        tokens_eval = tokenize_corpus(tokenizer, load_text("jargon"), 102_400)
        ppl = evaluate_perplexity(torch_logits_fn(teacher), make_windows(tokens_eval, 1024, 102_400, args.windows))
        return {"point": point, "variant": "dense", "mode": None, "tokens": 0, "heal_s": 0.0,
                "ppl": round(ppl.ppl, 3), "windows": ppl.windows,
                "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    variant, mode, tokens = spec.split(":")
    ckpt = ensure_checkpoint(variant, Path(args.checkpoints))
    student, _ = load_compressed(ckpt)
    made = json.loads((ckpt / "config.json").read_text()).get("procrustes", {})
    teacher, tokenizer = load_model("smollm2-135m")
    config = HealConfig(tokens=int(tokens), mode=mode, text=args.text, lr=args.lr, epochs=args.epochs,
                        seq_len=args.seq_len, batch_size=args.batch_size, threads=args.threads)
    result: dict = {"point": point, "variant": variant, "mode": mode, "tokens": int(tokens), "heal": config.to_dict(),
                    "checkpoint": ckpt.name, "calib": made.get("compression", {}).get("calib_text"),
                    "allocation": made.get("compression", {}).get("allocation")}
    start = time.perf_counter()
    if int(tokens):
        work = Path(args.work) / spec.replace(":", "-")
        report = heal_model(student, teacher, tokenizer, config, work, teacher_cache=cache_root() / "heal-teacher",
                            progress=not args.quiet)
        result["report"] = report.to_dict()
    result["heal_s"] = round(time.perf_counter() - start, 1)
    del teacher
    tokens_eval = tokenize_corpus(tokenizer, load_text("jargon"), 102_400)
    ppl = evaluate_perplexity(torch_logits_fn(student), make_windows(tokens_eval, 1024, 102_400, args.windows))
    result.update(ppl=round(ppl.ppl, 3), windows=ppl.windows)
    if full:  # the curve's last point: the whole protocol too
        result["ppl_full"] = round(evaluate_perplexity(torch_logits_fn(student),
                                                       make_windows(tokens_eval, 1024, 102_400, None)).ppl, 3)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return result


def series_of(row: dict) -> str:
    """The curve a row belongs to: variant, calibration text and allocation of its checkpoint, and mode."""
    made = ", ".join(x for x in (row.get("calib"), row.get("allocation")) if x)
    return f"{row['variant']}" + (f" ({made})" if made else "")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict[tuple, list] = {}
    dense = [r for r in rows if r["variant"] == "dense" and r.get("windows") == rows[0].get("windows")]
    if dense:
        ax.axhline(dense[0]["ppl"], color="k", ls="--", lw=1, label=f"dense {dense[0]['ppl']:.1f}")
        ax.axhline(3 * dense[0]["ppl"], color="grey", ls=":", lw=1, label="3x dense (target)")
    for r in rows:
        if r.get("windows") != rows[0].get("windows") or r["variant"] == "dense":
            continue
        series.setdefault((series_of(r), r["mode"] if r["tokens"] else None), []).append(r)
    for (variant, mode), pts in sorted(series.items(), key=str):
        if mode is None:
            continue
        zero = [p for (v, m), ps in series.items() if v == variant and m is None for p in ps]
        pts = sorted(zero + pts, key=lambda p: p["tokens"])
        ax.plot([max(p["tokens"], 1e3) for p in pts], [p["ppl"] for p in pts], marker="o", label=f"{variant} {mode}")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("healing tokens (0 plotted at 1e3)"), ax.set_ylabel(f"PPL, {rows[0].get('windows')} Jargon windows")
    ax.set_title("SmolLM2-135M, 20% removed: healing")
    ax.grid(True, which="both", alpha=0.3), ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", default="w-gs:blockwise:0,w-gs:blockwise:25600,w-gs:e2e:25600")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--text", default="mix")
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--checkpoints", default=str(ROOT / "artifacts" / "heal-bench"))
    p.add_argument("--work", default=str(ROOT / "artifacts" / "heal-bench" / "work"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "healing.json"))
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out, run the others")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_point(args.one, args)), flush=True)
        return 0

    from procrustes_onnx.core.environment import write_results

    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if args.resume and out.is_file() else []
    for point in [x for x in args.points.split(",") if x and not _measured(rows, x, args)]:
        row = run_one(__file__, point, _forward(args))
        if row is None:
            return 1
        rows.append(row)
        print(f"{row['point']:32s} ppl {row['ppl']:>10,.1f}  full {row.get('ppl_full', float('nan')):>8,.1f}  "
              f"heal {row['heal_s']:>7.1f} s  "
              f"peak {row['peak_rss_gib']:.1f} GiB", flush=True)
        write_results(out, {"benchmark": "healing", "dense_ppl": DENSE_PPL, "settings": _settings(args), "rows": rows})
    write_results(out, {"benchmark": "healing", "dense_ppl": DENSE_PPL, "settings": _settings(args), "rows": rows,
                        "fits": fits(rows)})
    plot(rows, out.with_suffix(".png"))
    _table(rows)
    for name, fit in fits(rows).items():
        if fit.get("plateau"):
            print(f"{name}: slope {fit['slope']}: a plateau, no extrapolation")
        else:
            print(f"{name}: slope {fit['slope']}, extrapolated tokens for 3x dense {fit.get('tokens_for_3x_dense')}, "
                  f"for 1.3x dense {fit.get('tokens_for_1.3x_dense')}")
    return 0


def fits(rows: list[dict]) -> dict:
    """Per (variant, mode) series with 2+ healed points on the same windows: the log-log slope b of
    PPL ~ a * tokens^-b, and the tokens that slope implies for 3x and 1.3x the dense PPL (an extrapolation
    of the measured points, labelled as such, never a measurement)."""
    import math

    dense = next((r["ppl"] for r in rows if r["variant"] == "dense"), None)
    out = {}
    for key in sorted({(series_of(r), r["mode"]) for r in rows if r["tokens"]}):
        # one point per token count (a point scored on the full protocol too repeats its 8-window PPL)
        pts = sorted({r["tokens"]: r["ppl"] for r in rows if (series_of(r), r["mode"]) == key and r["tokens"]
                      and r["windows"] == rows[0]["windows"]}.items())
        if len(pts) < 2:
            continue
        xs, ys = [math.log(t) for t, _ in pts], [math.log(p) for _, p in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        fit = {"points": pts, "slope": round(slope, 4)}
        if -PLATEAU_SLOPE <= slope:  # flat or rising: an extrapolation would be a number nobody measured
            fit["plateau"] = True
        elif dense:
            for name, factor in (("tokens_for_3x_dense", 3.0), ("tokens_for_1.3x_dense", 1.3)):
                fit[name] = float(f"{math.exp(mx + (math.log(factor * dense) - my) / slope):.3g}")
        out[f"{key[0]}:{key[1]}"] = fit
    return out


def _measured(rows: list[dict], point: str, args: argparse.Namespace) -> bool:
    """Whether ``point`` already has a row healed from the checkpoint it would use now."""
    variant = point.partition("@")[0].split(":")[0]
    if variant == "dense":
        return any(r["point"] == point for r in rows)
    name = checkpoint_name(variant, checkpoint_config(variant).to_dict())
    return any(r["point"] == point and r.get("checkpoint") == name for r in rows)


def _forward(args: argparse.Namespace) -> list[str]:
    flags = ["--windows", str(args.windows), "--text", args.text, "--epochs", str(args.epochs), "--seq-len",
             str(args.seq_len), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
             "--checkpoints", args.checkpoints, "--work", args.work, "--quiet"]
    return flags + (["--lr", str(args.lr)] if args.lr else [])


def _settings(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("windows", "text", "lr", "epochs", "seq_len", "batch_size", "threads")}


def _table(rows: list[dict]) -> None:
    print("| point | checkpoint | tokens | PPL (windows) | PPL full protocol | heal s | peak GiB |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        full = f"{r['ppl_full']:,.1f}" if "ppl_full" in r else "–"
        print(f"| {r['point']} | {r.get('checkpoint', '–')} | {r['tokens']:,} | {r['ppl']:,.1f} ({r['windows']}) | "
              f"{full} | {r['heal_s']} | "
              f"{r['peak_rss_gib']} |")


if __name__ == "__main__":
    sys.exit(main())
