"""artifacts/report.md, results.json and PNG plots: every number from the run that wrote them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from procrustes_onnx.core.environment import environment
from .pipeline_measure import weight_macs
from .pipeline_options import RunOptions

__all__ = ["write_report", "summary_rows"]


def _fmt(value, spec: str = ".2f", missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def summary_rows(results: dict) -> list[dict]:
    """One flat row per artifact, ratios against the dense row."""
    dense = results.get("dense", {})
    dense_macs = weight_macs(dense["inspect"]) if "inspect" in dense else None
    dense_params = dense.get("inspect", {}).get("parameters")
    rows = []
    for name, r in results.items():
        ins, ppl, bench = r.get("inspect", {}), r.get("perplexity", {}), r.get("benchmark", {})
        scores = r.get("tasks", {}).get("scores", {})
        accs = [v for k, v in scores.items() if k.endswith("/acc")]
        macs = weight_macs(ins) if ins else None
        decode = bench.get("decode_tokens_per_s")
        dense_decode = dense.get("benchmark", {}).get("decode_tokens_per_s")
        rows.append({
            "name": name,
            "removed_pct": 100 * (1 - ins["parameters"] / dense_params) if ins and dense_params else None,
            "parameters": ins.get("parameters"),
            "bytes": ins.get("total_bytes"),
            "ppl": ppl.get("ppl"),
            "zero_shot_acc": sum(accs) / len(accs) if accs else None,
            "prefill_ms": bench.get("prefill_ms", {}),
            "decode_tokens_per_s": decode,
            "decode_speedup": decode / dense_decode if decode and dense_decode else None,
            "ideal_speedup": dense_macs / macs if dense_macs and macs else None,
            "relative_error": r.get("validation", {}).get("relative_error"),
            "argmax_agreement": r.get("validation", {}).get("argmax_agreement"),
            "greedy_identical": r.get("validation", {}).get("greedy_identical"),
        })
    return rows


def _plots(out: Path, rows: list[dict]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if any(r["ppl"] for r in rows):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in rows:
            if r["ppl"] is not None:
                ax.scatter(r["removed_pct"] or 0, r["ppl"], label=r["name"])
                ax.annotate(r["name"], (r["removed_pct"] or 0, r["ppl"]), fontsize=8)
        ax.set_yscale("log"), ax.set_xlabel("parameters removed (%)"), ax.set_ylabel("perplexity (log)")
        ax.set_title("Perplexity vs parameters removed")
        made.append(_save(fig, out / "ppl_vs_removed.png"))
    if any(r["prefill_ms"] for r in rows):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in rows:
            seqs = sorted(int(s) for s in r["prefill_ms"])
            ax.plot(seqs, [r["prefill_ms"][s] if s in r["prefill_ms"] else r["prefill_ms"][str(s)] for s in seqs],
                    marker="o", label=r["name"])
        ax.set_xlabel("prompt tokens (batch 1)"), ax.set_ylabel("prefill latency (ms)"), ax.legend(fontsize=8)
        ax.set_title("Prefill latency, ONNX Runtime CPU")
        made.append(_save(fig, out / "latency_vs_seq.png"))
    if any(r["decode_tokens_per_s"] for r in rows):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        names = [r["name"] for r in rows]
        ax.bar(names, [r["decode_tokens_per_s"] or 0 for r in rows], label="measured")
        base = rows[0]["decode_tokens_per_s"] or 0
        ax.scatter(names, [base * (r["ideal_speedup"] or 1) for r in rows], color="k", marker="_", s=400,
                   label="dense x ideal (MACs)")
        ax.set_ylabel("decode tokens/s"), ax.legend(fontsize=8), ax.set_title("Decode with KV cache")
        made.append(_save(fig, out / "tokens_per_s.png"))
    return made


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")  # written whole, then renamed: a reader never sees half a plot
    fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    os.replace(tmp, path)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path.name


def _healing_lines(results: dict) -> list[str]:
    """The healing table: PPL before and after on the first windows, tokens used, held-out loss, time."""
    healed = {name: r["healing"] for name, r in results.items() if "healing" in r}
    if not healed:
        return []
    first = next(iter(healed.values()))
    lines = ["## Healing", "", f"Each variant was trained against the dense model with the same budget "
             f"({first['config']['tokens']:,} {first['config']['text']} tokens, {first['config']['mode']}); the "
             f"structure is unchanged. PPL here: torch, the first {first['windows']} windows of the evaluation text "
             "(the table above: the ONNX artifact, after healing).", "",
             "| variant | mode | tokens used | PPL before | PPL after | held-out before | held-out after | "
             "stopped early | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for name, h in healed.items():
        rep = h["report"]
        lines.append(f"| {name} | {rep['mode']} | {rep['tokens']:,} | {h['ppl_before']:,.1f} | {h['ppl_after']:,.1f} | "
                     f"{rep['heldout_before']:.4f} | {rep['heldout_after']:.4f} | "
                     f"{'yes' if rep['stopped_early'] else 'no'} | {rep['seconds']:.0f} |")
    return lines + ["", "Held-out: blockwise, the mean over layers of the normalised MSE of a layer's output; e2e, "
                    "the top-k KL to the dense model in nats per token.", ""]


def _budget_lines(results: dict, rows: list[dict]) -> list[str]:
    """Measured allocation / --max-loss: what each variant chose, the held-out loss it promised on calibration
    text, and the perplexity the evaluation text then measured (both as ratios to dense)."""
    budgeted = {name: r["compression"]["allocation"] for name, r in results.items()
                if r.get("compression", {}).get("allocation")}
    if not budgeted:
        return []
    ppl = {r["name"]: r["ppl"] for r in rows}
    lines = ["## Accuracy budget", "",
             "Kept shares chosen per matrix from each linear's loss ladder (`--allocation measured`, `--max-loss`; "
             "docs/compression_quality.md). The promise is measured on held-out calibration text, never on the "
             "evaluation text; the last column is what the evaluation text measured.", "",
             "| variant | plan shipped | budget | removed % | held-out PPL x dense (promised) | "
             "evaluation PPL x dense |", "|---|---|---|---|---|---|"]
    for name, a in budgeted.items():
        budget = f"--max-loss {a['max_loss']:g}" if "max_loss" in a else "--ratio"
        measured = ppl.get(name) / ppl["dense"] if ppl.get(name) and ppl.get("dense") else None
        lines.append(f"| {name} | {a['shipped']} | {budget} | {100 * a['removed']:.2f} | {a['heldout_ppl_ratio']:.3f} | "
                     f"{_fmt(measured, '.3f')} |")
    return lines + [""]


def quality_curve_plot(out: Path, curve: dict) -> str | None:
    """PPL vs removed % from `benchmarks/quality_curve.py` rows: one line per method and allocation, the
    `--max-loss` operating points marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in curve.get("rows", []) if not r["row"].endswith("@full") and r.get("ppl")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if "max_loss" in r or r["method"] == "dense":
            continue
        label = r["method"] + (f" ({r['allocation']})" if r.get("allocation") else "")
        series.setdefault(label, []).append((r["removed_pct"], r["ppl"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for i, r in enumerate(r for r in rows if "max_loss" in r):
        ax.scatter(r["removed_pct"], r["ppl"], marker="*", s=160, color="k", zorder=5)
        ax.annotate(f"--max-loss {r['max_loss']:g}", (r["removed_pct"], r["ppl"]), fontsize=8,
                    xytext=(6, 8 + 12 * i), textcoords="offset points")
    if curve.get("dense_ppl"):
        ax.axhline(curve["dense_ppl"], color="grey", linestyle="--", label="dense")
    ax.set_yscale("log"), ax.set_xlabel("parameters removed (%)"), ax.set_ylabel("perplexity (log)")
    ax.set_title("Perplexity vs parameters removed (benchmarks/quality_curve.py)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out / "quality_curve.png")


def quantized_rows(results: dict, reference: dict | None = None) -> list[dict]:
    """fp32 and weight-only rows on the same first windows (the fp32 PPL re-scored from its per-window
    NLLs), then the onnxruntime-genai builder's model as the reference point."""
    from procrustes_onnx.runtime.perplexity import prefix_ppl

    rows = []
    for name, r in results.items():
        q = r.get("quantized")
        if not q:
            continue
        windows = q.get("windows")
        fp32_ppl = prefix_ppl(r.get("perplexity", {}), windows) if windows else None
        q_ppl = q.get("perplexity", {}).get("ppl")
        rows.append({"name": name, "label": q["label"], "windows": windows, "mb_fp32": q["bytes_fp32"] / 1e6,
                     "mb": q["bytes"] / 1e6, "ppl_fp32": fp32_ppl, "ppl": q_ppl,
                     "ppl_change_pct": 100 * (q_ppl / fp32_ppl - 1) if q_ppl and fp32_ppl else None,
                     "decode_fp32": r.get("benchmark", {}).get("decode_tokens_per_s"),
                     "decode": q.get("benchmark", {}).get("decode_tokens_per_s"),
                     "logits_rel_error": q["logits_rel_error"], "top1_agreement": q["top1_agreement"]})
    if reference:
        rows.append({"name": reference["label"], "label": "reference", "windows": reference.get("windows"),
                     "mb_fp32": None, "mb": reference["bytes"] / 1e6, "ppl_fp32": None,
                     "ppl": reference.get("perplexity", {}).get("ppl"), "ppl_change_pct": None, "decode_fp32": None,
                     "decode": reference.get("benchmark", {}).get("decode_tokens_per_s"), "logits_rel_error": None,
                     "top1_agreement": None})
    return rows


def _quantized_lines(rows: list[dict], out: Path) -> list[str]:
    """The weight-only section: the table and the size-vs-PPL plot."""
    if not rows:
        return []
    windows = rows[0]["windows"]
    lines = ["## Weight-only quantization", "",
             f"Every artifact also as a weight-only {rows[0]['label'].split()[0]} copy (ONNX Runtime's MatMulNBits, "
             "the structured factors included; folder `<artifact>-int4`). PPL here: the first "
             f"{windows} windows, fp32 and quantized on the same tokens. Rel err and top-1: quantized against fp32 "
             "logits on a fixed sentence (quantize.json).", "",
             "| artifact | MB fp32 | MB quantized | PPL fp32 | PPL quantized | PPL change | decode tok/s fp32 | "
             "decode tok/s quantized | logits rel err | top-1 agree |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["name"], _fmt(r["mb_fp32"], ".1f"), _fmt(r["mb"], ".1f"), _fmt(r["ppl_fp32"], ".2f"), _fmt(r["ppl"], ".2f"),
            _fmt(r["ppl_change_pct"], "+.1f") + ("%" if r["ppl_change_pct"] is not None else ""),
            _fmt(r["decode_fp32"], ".1f"), _fmt(r["decode"], ".1f"), _fmt(r["logits_rel_error"], ".3f"),
            _fmt(r["top1_agreement"], ".2f")]) + " |")
    if not any(r["label"] == "reference" for r in rows):
        lines += ["", "No reference point: install the `genai` extra (onnxruntime-genai) to measure its model "
                  "builder's model of the same folder beside these."]
    plot = _size_ppl_plot(out, rows)
    return lines + ["", *([f"![{plot}]({plot})", ""] if plot else [])]


def _size_ppl_plot(out: Path, rows: list[dict]) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["name"], "fp32", r["mb_fp32"], r["ppl_fp32"]) for r in rows if r["label"] != "reference"]
    points += [(r["name"], r["label"], r["mb"], r["ppl"]) for r in rows]
    points = [p for p in points if p[2] and p[3]]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label, mb, ppl in points:
        style = ({"marker": "*", "s": 160, "color": "k"} if label == "reference" else
                 {"marker": "o" if label == "fp32" else "^", "s": 50})
        ax.scatter(mb, ppl, **style)
        ax.annotate(name if label == "reference" else f"{name} {label.split()[0]}", (mb, ppl), fontsize=7,
                    xytext=(3, -10) if label == "reference" else (3, 2), textcoords="offset points")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("MB on disk"), ax.set_ylabel(f"perplexity (first {rows[0]['windows']} windows)")
    ax.set_title("Size vs perplexity: does structure pay on top of quantization?")
    return _save(fig, out / "size_vs_ppl.png")


def write_report(out: Path, results: dict, opts: RunOptions, timing: dict, reference: dict | None = None) -> Path:
    env = environment()
    rows = summary_rows(results)
    plots = _plots(out, rows)
    qrows = quantized_rows(results, reference)
    seqs = list(opts.prefill_seqs) if opts.benchmark else []
    head = ["artifact", "removed %", "params", "MB on disk", f"PPL {opts.text}", "zero-shot acc",
            *[f"prefill {s} ms" for s in seqs], "decode tok/s", "decode speed-up", "ideal (MACs)",
            "ORT vs torch rel err", "argmax agree", "greedy = torch"]
    lines = [f"# procrustes-onnx report: {opts.model}", "",
             f"Measured {env['date']} on {env['machine']['cpu']} ({env['machine']['cores']} cores), "
             f"{opts.threads} threads; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + ".", "",
             f"Ratio asked: {opts.ratio:.0%} of parameters removed (counted as the ONNX file stores them). "
             f"Perplexity: {opts.eval_windows or 100} windows of 1024 tokens of `{opts.text}`"
             + (" (**quick run: truncated evaluation**)" if opts.quick else "") + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        prefill = [_fmt(r["prefill_ms"].get(s, r["prefill_ms"].get(str(s))), ".1f") for s in seqs]
        lines.append("| " + " | ".join([
            r["name"], _fmt(r["removed_pct"], ".1f"), _fmt(r["parameters"], ","),
            _fmt(r["bytes"] / 1e6 if r["bytes"] else None, ".1f"), _fmt(r["ppl"], ".2f"),
            _fmt(100 * r["zero_shot_acc"] if r["zero_shot_acc"] is not None else None, ".1f"), *prefill,
            _fmt(r["decode_tokens_per_s"], ".1f"), _fmt(r["decode_speedup"], ".2f"), _fmt(r["ideal_speedup"], ".2f"),
            _fmt(r["relative_error"], ".1e"), _fmt(r["argmax_agreement"], ".4f"),
            "–" if r["greedy_identical"] is None else ("yes" if r["greedy_identical"] else "no")]) + " |")
    limit = f"the first {opts.task_limit} items of each" if opts.task_limit else "all items of"
    from procrustes_onnx.compiler.config import CompressionConfig

    default = CompressionConfig()
    solver = {"calib": f"{opts.calib or default.calib_text} {opts.calib_samples or default.calib_samples}"
                       f"x{opts.calib_seq_len or default.calib_seq_len}",
              "ALS iterations": opts.iterations or default.iterations, **opts.solver}
    lines += ["", f"Zero-shot acc is the mean accuracy over {limit} {', '.join(opts.tasks)} (lm-eval, docs/tasks.md). "
              "Ideal = dense weight-MatMul MACs per token / this artifact's (tied head included). "
              "Solver: " + ", ".join(f"{k} {v}" for k, v in solver.items()) + ".", ""]
    lines += _healing_lines(results)
    lines += _budget_lines(results, rows)
    curve_path = Path(__file__).resolve().parent.parent / "docs" / "results" / "quality_curve.json"
    if curve_path.is_file() and Path(opts.model).name.lower().startswith("smollm2"):
        curve = json.loads(curve_path.read_text())
        plot = quality_curve_plot(out, curve)
        if plot:
            lines += ["## Quality vs size (benchmark)", "", "From `benchmarks/quality_curve.py` "
                      f"(docs/results/quality_curve.json, {curve.get('date', '')}, {curve.get('protocol', '')}): "
                      "the curve this run's variants sit on; stars mark `--max-loss` operating points.", "",
                      f"![{plot}]({plot})", ""]
    lines += _quantized_lines(qrows, out)
    lines += [f"![{p}]({p})" for p in plots]
    peaks = timing.get("peak_rss_gib", {})
    lines += ["", "## Stage times (s)", "", "Peak RSS: this process's high-water mark when the stage ended (Ray workers "
              "not included); the stage where it rises set it.", "",
              "| stage | seconds | peak RSS GiB |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {peaks.get(k, '')} |" for k, v in timing["stages_s"].items()]
    lines += [f"| **total** | {timing['total_s']} | |", ""]
    report = out / "report.md"
    tmp = report.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(report)
    options = {**vars(opts), "heal": opts.heal.to_dict() if opts.heal is not None else None}
    tmp = out / "results.json.tmp"
    options["quantize"] = vars(opts.quantize) if opts.quantize is not None else None
    tmp.write_text(json.dumps({**env, "options": options, "timing": timing, "summary": rows, "quantized": qrows,
                               "reference": reference, "results": results}, indent=2, default=str))
    tmp.replace(out / "results.json")
    return report
