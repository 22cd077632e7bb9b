"""Options of `procrustes-onnx run` (the main job), shared by the CLI and the pipeline."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

__all__ = ["VARIANTS", "RunOptions", "add_run_arguments"]

#: variant name -> CompressionConfig overrides
VARIANTS = {
    "w-kron": {"structure": "kron", "method": "weighted"},
    "w-gs": {"structure": "gs", "method": "weighted"},
    "f-kron": {"structure": "kron", "method": "frobenius"},
    "f-gs": {"structure": "gs", "method": "frobenius"},
    "slicegpt": {"method": "slicegpt"},
}
DEFAULT_VARIANTS = ("w-kron", "w-gs", "slicegpt")
QUICK_VARIANTS = ("w-kron", "slicegpt")  # --quick: the product's default and its baseline


@dataclass
class RunOptions:
    model: str = "smollm2-135m"
    out: str = "artifacts"
    ratio: float = 0.2
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    rotation: str | None = None
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    iterations: int | None = None
    text: str = "jargon"
    calib: str | None = None            # None: the compressor's default (kjv)
    eval_windows: int | None = None      # None: the whole protocol (100 windows)
    task_limit: int | None = None        # None: every item of the local tasks
    prefill_seqs: tuple[int, ...] = (128, 512, 1024)
    decode_tokens: int = 128
    quick: bool = False
    evaluate: bool = True
    benchmark: bool = True
    threads: int = os.cpu_count() or 2
    solver: dict = field(default_factory=dict)  # further CompressionConfig fields, e.g. {"rotation_iters": 20}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunOptions":
        default = QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS
        variants = [v for v in args.variants.split(",") if v] if args.variants else list(default)
        if args.no_baselines:
            variants = variants[:1]
        opts = cls(model=args.model, out=args.out, ratio=args.ratio, variants=variants, rotation=args.rotation,
                   calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, iterations=args.iterations,
                   text=args.text, calib=args.calib, quick=args.quick, evaluate=not args.no_eval, benchmark=not args.no_bench,
                   threads=args.threads, eval_windows=args.eval_windows, task_limit=args.task_limit)
        if args.quick:  # the whole chain, truncated: a few windows, a few items, short benchmarks
            opts.eval_windows = opts.eval_windows or 4
            opts.task_limit = opts.task_limit or 40
            opts.prefill_seqs = (128, 512)
            opts.decode_tokens = 32
            opts.calib_samples = opts.calib_samples or 8
            opts.calib_seq_len = opts.calib_seq_len or 256
            opts.iterations = opts.iterations or 5
            opts.solver = {"rotation_iters": 20}
        return opts


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="artifacts", help="artifact folder (default: artifacts/)")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of parameters removed (default 0.2)")
    p.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)} "
                                      f"(default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--no-baselines", action="store_true", help="only the first variant (W-Kron by default)")
    p.add_argument("--rotation", choices=["global", "per-position"])
    p.add_argument("--calib-samples", type=int)
    p.add_argument("--calib-seq-len", type=int)
    p.add_argument("--iterations", type=int)
    p.add_argument("--text", default="jargon", help="evaluation text (default jargon)")
    p.add_argument("--calib", help="calibration text (default kjv)")
    p.add_argument("--eval-windows", type=int, help="perplexity windows (default: the whole protocol, 100)")
    p.add_argument("--task-limit", type=int, help="items per local zero-shot task (default: all)")
    p.add_argument("--quick", action="store_true", help="whole chain on a truncated evaluation (< 10 minutes)")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity and zero-shot tasks")
    p.add_argument("--no-bench", action="store_true", help="skip the prefill/decode benchmark")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
