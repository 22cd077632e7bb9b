"""Measurements the main job takes on each ONNX artifact: validation, perplexity, tasks, speed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from procrustes_onnx.compiler.checkpoint import load_compressed, load_model
from procrustes_onnx.core.texts import tokenize_corpus
from procrustes_onnx.exporters.pipeline import inspect_model
from procrustes_onnx.exporters.quantize import QUANT_FILE
from procrustes_onnx.runtime.benchmark import measure_decode, measure_prefill
from procrustes_onnx.runtime.generate import SamplingConfig, generate_ids
from procrustes_onnx.runtime.perplexity import PROTOCOL_TOKENS, evaluate_perplexity, make_windows, torch_logits_fn
from procrustes_onnx.runtime.perplexity_ort import ort_logits_fn, tokenizer_for_onnx
from procrustes_onnx.runtime.session import OnnxCausalLM

from .pipeline_options import HEAL_SCORE_WINDOWS, RunOptions
from .stages import Artifact

__all__ = ["inspect", "validate", "perplexity", "tasks", "benchmark", "compression_summary", "weight_macs",
           "heal_scores"]


def inspect(folder: Path) -> dict:
    info = inspect_model(folder)
    return {k: info[k] for k in ("nodes", "op_counts", "parameters_by_kind", "parameters", "total_bytes", "matmuls")}


def weight_macs(info: dict) -> int:
    """Multiply-accumulates per token of every weight MatMul, the tied head (the embedding) included."""
    kinds = info["parameters_by_kind"]
    return kinds.get("dense_matmul", 0) + kinds.get("structured_factors", 0) + kinds.get("embedding", 0)


def _torch_model(artifact: Artifact):
    """The torch model an ONNX folder was exported from: the dense model or a compressed checkpoint."""
    source = artifact.origin
    return (load_model(str(source.path))[0] if source.kind == "model" else load_compressed(source.path)[0]).eval()


def _tokens(onnx_dir: Path, text: str, n: int) -> torch.Tensor:
    return tokenize_corpus(tokenizer_for_onnx(onnx_dir), text, n)


def validate(artifact: Artifact, text: str, opts: RunOptions) -> dict:
    """ONNX Runtime vs torch on real text: logits of 2 windows of 512 tokens, and 32 greedy tokens with the cache."""
    torch.set_num_threads(opts.threads)
    model = _torch_model(artifact)
    lm = OnnxCausalLM(artifact.path, threads=opts.threads)
    ids = _tokens(artifact.path, text, 1024).view(2, 512)
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits.double().numpy()
    got = lm.logits(ids.numpy()).astype(np.float64)
    diff = got - ref
    prompt = ids[0, :64]
    steps = 32
    with torch.inference_mode():
        torch_out = model.generate(prompt[None], max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                                   pad_token_id=0)[0, 64:].tolist()
    ort_out = generate_ids(lm, prompt.tolist(), SamplingConfig(max_new_tokens=steps), eos_ids=[]).token_ids
    return {
        "max_abs_error": float(np.abs(diff).max()),
        "relative_error": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
        "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        "greedy_tokens": steps,
        "greedy_identical": ort_out == torch_out,
        "greedy_matching_prefix": next((i for i, (a, b) in enumerate(zip(ort_out, torch_out)) if a != b),
                                       min(len(ort_out), len(torch_out))),
    }


def perplexity(artifact: Artifact, text: str, opts: RunOptions, windows: int | None = None) -> dict:
    """ONNX Runtime perplexity on the protocol's windows (the first ``windows`` of them; default --eval-windows)."""
    windows = make_windows(_tokens(artifact.path, text, PROTOCOL_TOKENS), max_windows=windows or opts.eval_windows)
    fn = ort_logits_fn(artifact.path, threads=opts.threads, device="cpu")
    return evaluate_perplexity(fn, windows, desc=f"ppl {artifact.path.name}").to_dict()


def tasks(artifact: Artifact, opts: RunOptions) -> dict:
    from procrustes_onnx.runtime.lm_eval_adapter import run_eval

    summary = run_eval(artifact.path, list(opts.tasks), limit=opts.task_limit, threads=opts.threads)
    scores = {}
    for task, metrics in summary["results"].items():
        for metric in ("acc,none", "acc_norm,none", "word_perplexity,none", "bits_per_byte,none"):
            if metric in metrics:
                scores[f"{task}/{metric.split(',')[0]}"] = metrics[metric]
    return {"scores": scores, "limit": opts.task_limit, "tasks": list(opts.tasks)}


def quantize_summary(folder: Path) -> dict:
    """What quantize.json says of a weight-only artifact: sizes, ops, what stayed float, the logits check."""
    q = json.loads((Path(folder) / QUANT_FILE).read_text())
    return {"label": q["label"], "bytes": q["bytes_after"], "bytes_fp32": q["bytes_before"],
            "quantized_ops": q["quantized_ops"], "kept_float": len(q["kept_float"]),
            "logits_rel_error": q["logits_rel_error"], "top1_agreement": q["top1_agreement"]}


def benchmark(artifact: Artifact, opts: RunOptions) -> dict:
    """Prefill latency (batch 1) per sequence length, decode tokens/s with the cache, session creation."""
    lm = OnnxCausalLM(artifact.path, threads=opts.threads)
    prefill = {seq: 1000 * measure_prefill(lm, 1, seq, repeats=3 if seq <= 512 else 2)["seconds"]
               for seq in opts.prefill_seqs}
    decode = measure_decode(lm, prompt=128, new_tokens=opts.decode_tokens)
    return {"prefill_ms": prefill, "decode_tokens_per_s": decode["tokens_per_s"], "decode_prompt": 128,
            "decode_tokens": opts.decode_tokens, "session_create_s": lm.create_seconds, "threads": opts.threads}


def heal_scores(unhealed: Path, healed: Path, text: str, opts: RunOptions) -> dict:
    """PPL (torch) of a checkpoint before and after healing on the evaluation's first few windows, and what
    the heal stage reports (tokens used, held-out loss, seconds)."""
    torch.set_num_threads(opts.threads)
    out = {"windows": HEAL_SCORE_WINDOWS}
    for name, folder in (("before", unhealed), ("after", healed)):
        model, tokenizer = load_compressed(folder)
        windows = make_windows(tokenize_corpus(tokenizer, text, PROTOCOL_TOKENS), max_windows=HEAL_SCORE_WINDOWS)
        out[f"ppl_{name}"] = evaluate_perplexity(torch_logits_fn(model), windows).ppl
    record = json.loads((Path(healed) / "healing.json").read_text())
    out["report"] = {k: v for k, v in record["report"].items() if k != "history"}
    out["config"] = record["config"]
    return out


def compression_summary(checkpoint: Path) -> dict:
    config = json.loads((Path(checkpoint) / "config.json").read_text()).get("procrustes", {})
    keep = ("promised_params", "original_params", "removed", "seconds", "allocation")
    return {k: config[k] for k in keep if k in config}
