"""Options of `procrustes-onnx run` (the main job), shared by the CLI and the pipeline."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from procrustes_onnx.core.errors import UserError

__all__ = ["VARIANTS", "RUN_TASKS", "RUN_HEAL_TOKENS", "RunOptions", "add_run_arguments", "heal_config_from_args",
           "quantize_config_from_args", "QUANT_WINDOWS"]

#: variant name -> CompressionConfig overrides
VARIANTS = {
    # measured allocation: 8x (20% removed) to 14x (5%) lower PPL than uniform shares (docs/compression_quality.md)
    "w-kron": {"structure": "kron", "method": "weighted", "allocation": "measured"},
    "w-gs": {"structure": "gs", "method": "weighted", "allocation": "measured"},
    "f-kron": {"structure": "kron", "method": "frobenius"},
    "f-gs": {"structure": "gs", "method": "frobenius"},
    "slicegpt": {"method": "slicegpt"},
}
DEFAULT_VARIANTS = ("w-kron", "w-gs", "slicegpt")
QUICK_VARIANTS = ("w-kron",)  # --quick: the product's default only (add baselines with --variants)
#: the run's zero-shot tasks: the multiple-choice ones (the *_ppl tasks repeat the perplexity stage at
#: about 2 s a passage; `procrustes-onnx eval --tasks` runs them)
RUN_TASKS = ("jargon_cloze", "kjv_cloze")
#: solver settings of the main job, lighter than the paper's (50 ALS iterations, 100 rotation steps,
#: 32 x 512 calibration tokens) so that the whole run fits an hour on 2 cores; flags override them
RUN_SOLVER = {"iterations": 10, "rotation_iters": 50, "calib_samples": 16, "calib_seq_len": 512}
QUICK_SOLVER = {"iterations": 5, "rotation_iters": 10, "calib_samples": 8, "calib_seq_len": 256}
#: healing budget of the main job per variant (every variant, SliceGPT included, gets the same), and of --quick
RUN_HEAL_TOKENS = 8_192
QUICK_HEAL_TOKENS = 2_048
#: Jargon windows (torch) on which the heal stage scores each checkpoint before and after healing
HEAL_SCORE_WINDOWS = 4
#: Jargon windows on which each quantized artifact and its fp32 source are compared (the first ones)
QUANT_WINDOWS = 8


def quantize_config_from_args(args: argparse.Namespace, default: str = "none"):
    """The QuantizeConfig of the --quantize* flags (on export, rewrite, quantize and run), None for none."""
    from procrustes_onnx.exporters.quantize import QuantizeConfig

    precision = getattr(args, "quantize", None) or default
    if precision == "none":
        return None
    head = {"same": None, "int4": 4, "int8": 8}[args.quantize_head]
    return QuantizeConfig(bits=int(precision[3:]), block_size=args.quantize_block,
                          symmetric=not args.quantize_asymmetric, algorithm=args.quantize_algorithm, head_bits=head,
                          embedding=not args.no_quantize_embedding, accuracy_level=args.quantize_accuracy,
                          keep=args.quantize_keep, pack=not args.no_quantize_pack).validate()


def heal_config_from_args(args: argparse.Namespace, default_tokens: int | None = None):
    """A HealConfig from the `--heal-*` flags (on heal, compress and run); unset flags keep its defaults."""
    from procrustes_onnx.compiler.heal import HealConfig

    fields = HealConfig.__dataclass_fields__
    given = {k[len("heal_"):]: v for k, v in vars(args).items()
             if k.startswith("heal_") and k[len("heal_"):] in fields and v is not None}
    given.setdefault("tokens", default_tokens if default_tokens is not None else HealConfig().tokens)
    for name in ("device", "threads"):
        if getattr(args, name, None):
            given[name] = getattr(args, name)
    return HealConfig(**given)


@dataclass
class RunOptions:
    model: str = "smollm2-135m"
    out: str = "artifacts"
    ratio: float = 0.2
    max_loss: float | None = None        # ProcrustesGPT variants find their own removal (SliceGPT keeps ratio)
    allocation: str | None = None        # None: the compressor's default (middle layers first)
    heldout_samples: int | None = None
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    rotation: str | None = None
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    iterations: int | None = None
    text: str = "jargon"
    calib: str | None = None            # None: the compressor's default (kjv)
    eval_windows: int | None = None      # None: the whole protocol (100 windows)
    task_limit: int | None = 100         # items per task (None: all 400)
    tasks: tuple[str, ...] = RUN_TASKS
    prefill_seqs: tuple[int, ...] = (128, 512, 1024)
    decode_tokens: int = 128
    quick: bool = False
    evaluate: bool = True
    benchmark: bool = True
    threads: int = os.cpu_count() or 2
    workers: int = 1                    # independent solves at once, on Ray (the result does not change)
    ray_address: str | None = None      # a Ray cluster for them
    solver: dict = field(default_factory=dict)  # further CompressionConfig fields, e.g. {"rotation_iters": 20}
    overwrite: bool = False             # write into a non-empty folder the tool did not make (its files kept)
    heal: object = None                 # a HealConfig; None or tokens == 0: no healing
    quantize: object = None             # a QuantizeConfig: a weight-only copy of every artifact; None: fp32 only
    reference: bool = True              # with quantize: onnxruntime-genai's builder model beside ours, if installed
    attention: str = "auto"             # "gqa"/"auto": one GroupQueryAttention node per layer (exporters.gqa)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunOptions":
        from procrustes_onnx.compiler.fanout import Fanout, default_workers

        default = QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS
        variants = [v for v in args.variants.split(",") if v] if args.variants else list(default)
        if args.no_baselines:
            variants = variants[:1]
        solver = dict(QUICK_SOLVER if args.quick else RUN_SOLVER)
        given = {"iterations": args.iterations, "calib_samples": args.calib_samples,
                 "calib_seq_len": args.calib_seq_len}
        solver.update({k: v for k, v in given.items() if v is not None})
        tasks = tuple(t for t in args.tasks.split(",") if t) if args.tasks else RUN_TASKS
        if args.max_loss is not None and args.ratio is not None:
            raise UserError("--max-loss and --ratio both given: pass one (--max-loss lets each ProcrustesGPT variant "
                            "find its removal; SliceGPT then runs at the default 20%)")
        opts = cls(model=args.model, out=args.out, ratio=0.2 if args.ratio is None else args.ratio,
                   max_loss=args.max_loss, allocation=args.allocation, heldout_samples=args.heldout_samples,
                   variants=variants, rotation=args.rotation,
                   calib_samples=solver.pop("calib_samples"), calib_seq_len=solver.pop("calib_seq_len"),
                   iterations=solver.pop("iterations"), text=args.text, calib=args.calib, quick=args.quick,
                   evaluate=not args.no_eval, benchmark=not args.no_bench, threads=args.threads,
                   eval_windows=args.eval_windows, tasks=tasks, solver=solver, overwrite=args.overwrite,
                   task_limit=None if args.task_limit == 0 else (args.task_limit or (20 if args.quick else 100)),
                   heal=heal_config_from_args(args, QUICK_HEAL_TOKENS if args.quick else RUN_HEAL_TOKENS),
                   quantize=quantize_config_from_args(args, default="int4"), reference=not args.no_reference,
                   workers=args.workers or default_workers(), ray_address=args.ray_address,
                   attention=args.attention)
        opts.heal.validate()
        Fanout(opts.workers, opts.ray_address).check()  # before the first model loads
        if args.quick:  # the whole chain, truncated: a few windows, a few items, short benchmarks
            opts.eval_windows = opts.eval_windows or 4
            opts.prefill_seqs = (128, 512)
            opts.decode_tokens = 32
        return opts


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    from .cli_args import THREADS_MAX, count, fraction
    from .cli_stages import add_attention_argument

    p.add_argument("--out", default="artifacts", help="artifact folder (default: artifacts/; a rerun resumes)")
    p.add_argument("--overwrite", action="store_true",
                   help="use a non-empty --out that procrustes-onnx did not make (files in it are kept)")
    p.add_argument("--ratio", type=fraction(0, 0.9, high_open=True),
                   help="fraction of parameters removed (default 0.2)")
    p.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)} "
                                      f"(default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--no-baselines", action="store_true", help="only the first variant (W-Kron by default)")
    p.add_argument("--rotation", choices=["global", "per-position"])
    p.add_argument("--calib-samples", type=count())
    p.add_argument("--calib-seq-len", type=count(2))
    p.add_argument("--iterations", type=count(0))
    p.add_argument("--text", default="jargon", help="evaluation text (default jargon)")
    p.add_argument("--calib", help="calibration text (default kjv)")
    p.add_argument("--eval-windows", type=count(), help="perplexity windows (default: the whole protocol, 100)")
    p.add_argument("--tasks", help=f"comma-separated lm-eval tasks (default {','.join(RUN_TASKS)})")
    p.add_argument("--task-limit", type=count(0), help="items per task (default 100, --quick 20; 0: all)")
    p.add_argument("--quick", action="store_true", help="whole chain on a truncated evaluation (< 10 minutes)")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity and zero-shot tasks")
    p.add_argument("--no-bench", action="store_true", help="skip the prefill/decode benchmark")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the reference point (onnxruntime-genai's model builder at the --quantize precision)")
    p.add_argument("--threads", type=count(1, THREADS_MAX), default=os.cpu_count() or 2)
    add_attention_argument(p)
