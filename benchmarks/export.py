"""SmolLM2-135M: export (KV cache), structured rewrite with Kron/GS factors at the planner's 20%-removed
shapes, and ONNX Runtime vs torch agreement (4 Jargon windows, 64-token greedy generation).

Until a compressed checkpoint is given (--checkpoint), the structured variants use the Frobenius
projection of the original (unrotated, unfused) weights onto the specs ``compiler.compress`` plans for
ratio 0.2: the shapes are real, the quality is not (no rotation, no calibration). The dense export is
rewritten directly (the rewrite only needs the map and the factors), so one export serves all variants.

    python benchmarks/export.py [--window 1024] [--out docs/results/export.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from procrustes_onnx.compiler.checkpoint import load_model
from procrustes_onnx.compiler.compress import count_params, plan_for_model
from procrustes_onnx.compiler.config import CompressionConfig
from procrustes_onnx.compiler.fusion import fuse_norms
from procrustes_onnx.core.environment import cpu_model, package_versions
from procrustes_onnx.core.texts import load_text, tokenize_corpus
from procrustes_onnx.exporters import export_onnx, inspect_onnx, rewrite_structured_matmuls
from procrustes_onnx.ops import StructuredLinear, project_to_spec
from procrustes_onnx.runtime.generate import SamplingConfig, generate_ids
from procrustes_onnx.runtime.session import OnnxCausalLM


def machine() -> dict:
    return {"cores": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(),
            "load_average_1m_at_start": os.getloadavg()[0]}  # the box is shared: timings are indicative


def versions() -> dict:
    return {**package_versions(("torch", "onnxruntime", "transformers", "onnx")), "python": platform.python_version()}


def structured_variant(model: torch.nn.Module, structure: str, ratio: float) -> tuple[torch.nn.Module, dict, dict]:
    """(torch model with StructuredLinear layers, rewrite factor map, plan summary) for the planner's specs."""
    fused = fuse_norms(copy.deepcopy(model))
    config = CompressionConfig(structure=structure, ratio=ratio, rotation="global", method="frobenius")
    plan = plan_for_model(fused, config, count_params(model))
    del fused
    variant = copy.deepcopy(model)
    factor_map = {}
    for entry in plan.entries:
        linear = variant.get_submodule(entry.path)
        weight = linear.weight.detach().T.double()  # in x out
        matrix = project_to_spec(weight, entry.spec).float()
        parent, _, child = entry.path.rpartition(".")
        bias = linear.bias.detach() if linear.bias is not None else None
        setattr(variant.get_submodule(parent), child, StructuredLinear(matrix, bias))
        factor_map[entry.path] = {"spec": matrix.spec(), "bias": bias is not None,
                                "factors": {k: v.detach().clone() for k, v in matrix.factors().items()}}
    summary = {"matrices": len(plan.entries), "kept_fraction": plan.kept, "removed": plan.removed,
               "example_spec": plan.entries[0].spec}
    return variant.eval(), factor_map, summary


def window_agreement(model: torch.nn.Module, lm: OnnxCausalLM, windows: torch.Tensor) -> dict:
    """Max abs error, relative error (max|d| / max|torch|) and argmax agreement over all windows."""
    max_abs, max_ref, agree, total = 0.0, 0.0, 0, 0
    for row in windows:
        ids = row[None]
        with torch.no_grad():
            ref = model(input_ids=ids).logits[0].numpy()
        got = lm.logits(ids.numpy())[0]
        max_abs = max(max_abs, float(np.abs(got - ref).max()))
        max_ref = max(max_ref, float(np.abs(ref).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[0]
    return {"max_abs_err": max_abs, "rel_err": max_abs / max_ref, "argmax_agreement": agree / total}


def greedy_agreement(model: torch.nn.Module, lm: OnnxCausalLM, prompt: torch.Tensor, new_tokens: int) -> dict:
    with torch.no_grad():
        ref = model.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, prompt.numel():].tolist()
    result = generate_ids(lm, prompt.tolist(), SamplingConfig(max_new_tokens=new_tokens))
    return {"tokens": new_tokens, "identical": result.token_ids == ref,
            "first_mismatch": next((i for i, (a, b) in enumerate(zip(result.token_ids, ref)) if a != b), None),
            "ort_decode_tokens_per_s": round(result.decode_tokens_per_s, 1)}


def summarize(info: dict) -> dict:
    return {k: info[k] for k in ("total_bytes", "bytes_on_disk", "nodes", "op_counts", "parameters_by_kind",
                                 "parameters", "matmuls")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", default=None, help="folder for the artifacts (default: a temp folder)")
    ap.add_argument("--out", default="docs/results/export.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-export-"))
    model, tokenizer = load_model(args.model)
    tokens = tokenize_corpus(tokenizer, load_text("jargon"), args.window * (args.windows + 1))
    windows = tokens[: args.window * args.windows].view(args.windows, args.window)
    prompt = tokens[args.window * args.windows: args.window * args.windows + 32]

    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), "versions": versions(), "model": args.model,
               "settings": {"window": args.window, "windows": args.windows, "text": "jargon",
                            "new_tokens": args.new_tokens, "prompt_tokens": int(prompt.numel()),
                            "ort_threads": args.threads, "ratio": args.ratio,
                            "structured_factors": "Frobenius projection of the original weights on the planned specs"},
               "variants": {}}
    start = time.perf_counter()
    dense_path = export_onnx(model, work / "dense", with_past=True, tokenizer=tokenizer)
    export_s = time.perf_counter() - start
    print(f"dense export {export_s:.1f} s -> {dense_path}", flush=True)

    variants = {"dense": (model, None, None)}
    for structure in ("kron", "gs"):
        variants[structure] = structured_variant(model, structure, args.ratio)
    for name, (torch_model, factor_map, plan) in variants.items():
        entry: dict = {}
        if factor_map is None:
            path, entry["export_seconds"] = dense_path, round(export_s, 1)
        else:
            t0 = time.perf_counter()
            path = rewrite_structured_matmuls(dense_path, work / name, factor_map=factor_map)
            entry["rewrite_seconds"] = round(time.perf_counter() - t0, 1)
            entry["plan"] = plan
            entry["rewrite"] = json.loads((path.parent / "rewrite.json").read_text())
            entry["rewrite"].pop("modules")
        entry.update(summarize(inspect_onnx(path)))
        lm = OnnxCausalLM(path, threads=args.threads)
        entry["session_create_seconds"] = round(lm.create_seconds, 2)
        entry["windows"] = window_agreement(torch_model, lm, windows)
        entry["greedy"] = greedy_agreement(torch_model, lm, prompt, args.new_tokens)
        results["variants"][name] = entry
        print(f"{name}: done", flush=True)
        del lm

    print(f"\n{'variant':8} {'MB on disk':>10} {'params':>12} {'nodes':>6} {'MatMul':>6} {'rel err':>9} "
          f"{'max abs':>9} {'argmax':>7} {'greedy64':>8}")
    for name, e in results["variants"].items():
        print(f"{name:8} {e['total_bytes'] / 2**20:10.1f} {e['parameters']:12,} {e['nodes']:6} "
              f"{e['op_counts'].get('MatMul', 0):6} {e['windows']['rel_err']:9.2e} {e['windows']['max_abs_err']:9.2e} "
              f"{e['windows']['argmax_agreement']:7.4f} {str(e['greedy']['identical']):>8}")
    results["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.rename(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
