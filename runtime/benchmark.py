"""Measurements for the runtime benchmark: prefill latency, cached decode speed, session time, size, RSS, MACs.

`measure_model` is meant to run in a fresh process per model (benchmarks/runtime.py does that) so the
peak resident memory belongs to one model. Timings: one warm-up run, then the median of `repeats`.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from procrustes_onnx.core.artifacts import onnx_files
from procrustes_onnx.runtime.session import OnnxCausalLM, resolve_onnx_path

__all__ = ["measure_prefill", "measure_decode", "measure_model", "bytes_on_disk", "matmul_macs_per_token",
           "fusion_report", "peak_rss_mib"]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far: VmHWM, which (unlike ru_maxrss) does not carry
    the parent's peak across fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bytes_on_disk(path: str | Path) -> int:
    """model.onnx plus every external-data file next to it that the graph names (model.onnx.data ...)."""
    return sum(onnx_files(resolve_onnx_path(path)).values())


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: ORT allocates arenas and picks kernels on the first run of each shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_prefill(lm: OnnxCausalLM, batch: int, seq: int, repeats: int = 3, seed: int = 0) -> dict:
    """Median latency of one prefill (empty past) of `batch` x `seq` random tokens."""
    vocab = 256
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, seq))
    seconds = _median_seconds(lambda: lm.forward(ids), repeats)
    return {"batch": batch, "seq": seq, "seconds": seconds, "tokens_per_s": batch * seq / seconds}


def measure_decode(lm: OnnxCausalLM, prompt: int = 128, new_tokens: int = 128, repeats: int = 1,
                   seed: int = 0) -> dict:
    """Greedy decode of exactly `new_tokens` tokens after a `prompt`-token prefill, with the KV cache."""
    ids = np.random.default_rng(seed).integers(0, 256, size=(1, prompt))

    def run(steps: int) -> tuple[float, float]:
        start = time.perf_counter()
        logits, cache = lm.prefill(ids)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            logits, cache = lm.decode_step(logits.argmax(-1), cache)
        return prefill, time.perf_counter() - start

    run(4)  # warm-up
    runs = [run(new_tokens) for _ in range(repeats)]
    decode = statistics.median(r[1] for r in runs)
    return {"prompt": prompt, "new_tokens": new_tokens, "prefill_seconds": statistics.median(r[0] for r in runs),
            "decode_seconds": decode, "tokens_per_s": new_tokens / decode, "ms_per_token": 1000 * decode / new_tokens}


def measure_model(path: str | Path, *, prefill: Sequence[tuple[int, int]] = ((1, 128),), decode_prompt: int = 128,
                  decode_tokens: int = 128, repeats: int = 3, threads: int | None = None, device: str = "cpu",
                  opt_level: str = "all") -> dict:
    """Every number the benchmark reports for one model, measured in this process."""
    rss_before = peak_rss_mib()
    lm = OnnxCausalLM(path, device, threads, opt_level)
    rss_session = peak_rss_mib()
    result = {"path": str(lm.path), "bytes_on_disk": bytes_on_disk(lm.path), "session": vars(lm.info),
              "session_seconds": lm.create_seconds, "rss_mib_before_session": rss_before,
              "rss_mib_after_session": rss_session,
              "prefill": [measure_prefill(lm, b, s, repeats) for b, s in prefill],
              "decode": measure_decode(lm, decode_prompt, decode_tokens, max(1, repeats // 2)) if decode_tokens else None}
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def matmul_macs_per_token(path: str | Path) -> dict:
    """Multiply-accumulates per token of the model's linear layers (attention scores excluded).

    From matmul_map.json when the exporter wrote one (structured entries through `ops`' own `macs`), else from
    the graph: each MatMul/Gemm whose weight is an initializer (or a Transpose of one) counts K x N."""
    onnx_path = resolve_onnx_path(path)
    mapping = onnx_path.parent / "matmul_map.json"
    if mapping.is_file():
        import torch  # here only: the ORT runtime (session, generate, benchmark) loads without torch

        from procrustes_onnx.ops.spec import factor_shapes, structured_from_spec

        total, lm_head = 0, 0
        for name, entry in json.loads(mapping.read_text()).items():
            spec = entry.get("structured")
            if spec:
                tensors = {k: torch.zeros(v) for k, v in factor_shapes(spec).items()}
                macs = structured_from_spec(spec, tensors).macs(1)
            else:
                macs = int(entry["shape"][0]) * int(entry["shape"][1])
            total += macs
            lm_head += macs if name.endswith("lm_head") else 0
        return {"source": "matmul_map.json", "macs_per_token": total, "lm_head_macs": lm_head}

    model = ir.load(onnx_path)
    inits = model.graph.initializers
    total = 0
    for node in model.graph.all_nodes():
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        w = node.inputs[1]
        if w.name not in inits and w.producer() is not None and w.producer().op_type == "Transpose":
            w = w.producer().inputs[0]
        if w.name in inits and w.shape is not None and len(w.shape) == 2:
            total += int(w.shape[0]) * int(w.shape[1])
    return {"source": "graph initializers", "macs_per_token": total, "lm_head_macs": None}


def _op_counts(model) -> Counter:
    return Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.all_nodes())


def fusion_report(path: str | Path, out_path: str | Path | None = None) -> dict:
    """Apply onnxscript's ORT transformer fusions; report what fused and which op types changed.

    `out_path` (an .onnx file) keeps the fused model for timing."""
    onnx_path = resolve_onnx_path(path)
    model = ir.load(onnx_path)
    before = _op_counts(model)
    start = time.perf_counter()
    try:
        model, fusions = optimize_for_ort(model)
    except Exception as exc:  # a fusion bug must not end the benchmark: report it
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    after = _op_counts(model)
    changed = {op: [before.get(op, 0), after.get(op, 0)] for op in sorted(set(before) | set(after))
               if before.get(op, 0) != after.get(op, 0)}
    report = {"seconds": time.perf_counter() - start, "fusions": {k: v for k, v in fusions.items() if v},
              "op_counts_changed": changed, "matmuls_before": before.get("MatMul", 0),
              "matmuls_after": after.get("MatMul", 0)}
    if out_path is not None:
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "generation_config.json", "matmul_map.json"):
            if (onnx_path.parent / f).is_file():
                (out.parent / f).write_bytes((onnx_path.parent / f).read_bytes())
        ir.save(model, out, external_data=out.name + ".data")
        report["path"] = str(out)
    return report
