"""CLI verbs for the pipeline stages: each parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import os
import sys

from procrustes_onnx.cli_args import (SEED_MAX, THREADS_MAX, count, fraction, parse_kept, parse_layers, parse_list,
                                      parse_structures)
from procrustes_onnx.core.errors import UserError

_THREADS = os.cpu_count() or 2


def cmd_compress(args: argparse.Namespace) -> int:
    from procrustes_onnx.compiler.compress import compress_cli

    overrides = {"structure": args.structure, "ratio": args.ratio, "preset": args.preset, "rotation": args.rotation,
                 "method": args.method, "iterations": args.iterations, "calib_text": args.calib,
                 "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len, "seed": args.seed,
                 "compress_embeddings": args.compress_embeddings or None, "refine": args.refine,
                 "allocation": args.allocation, "max_loss": args.max_loss, "heldout_samples": args.heldout_samples,
                 "workers": args.workers, "ray_address": args.ray_address, "stream": args.stream or None,
                 "device": args.device}
    if args.kept:
        overrides["kept"] = parse_kept("--kept", args.kept)
    if args.dense_layers is not None:
        overrides["dense_layers"] = parse_layers("--dense-layers", args.dense_layers)
    if args.dense_roles is not None:
        overrides["dense_roles"] = parse_list("--dense-roles", args.dense_roles)
    if args.structures:
        overrides["structures"] = parse_structures("--structures", args.structures)
    from procrustes_onnx.pipeline_options import heal_config_from_args

    heal = heal_config_from_args(args, default_tokens=0)
    heal.validate()  # before minutes of compression
    if not heal.tokens:
        print(compress_cli(model=args.model, out=args.out, config=args.config, overwrite=args.overwrite, **overrides))
        return 0
    import shutil
    from pathlib import Path

    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.compiler.heal import heal_checkpoint
    from procrustes_onnx.core.sources import cache_root

    out = Path(args.out)
    unhealed = out.parent / f".{out.name}.unhealed"  # the training-free checkpoint, until the healed one is written
    compress_cli(model=args.model, out=str(unhealed), config=args.config, overwrite=True, **overrides)
    teacher, tokenizer = load_model(args.model)
    print(heal_checkpoint(unhealed, out, teacher, tokenizer, heal, teacher_cache=cache_root() / "heal-teacher"))
    shutil.rmtree(unhealed, ignore_errors=True)
    return 0


def _write_quantized(write, out: str, inputs: list, args: argparse.Namespace):
    """``write(folder)`` the fp32 artifact; with --quantize, into a hidden sibling that is quantized into
    ``out`` and then removed (``out`` is checked before minutes of export)."""
    import shutil
    from pathlib import Path

    from procrustes_onnx.core.outputs import check_output
    from procrustes_onnx.exporters.quantize import quantize_artifact
    from procrustes_onnx.pipeline_options import quantize_config_from_args

    config = quantize_config_from_args(args)
    if config is None:
        return write(out)
    check_output(out, inputs=inputs, overwrite=args.overwrite)
    fp32 = Path(out).resolve().parent / f".{Path(out).name}.fp32"
    try:
        write(str(fp32))
        return quantize_artifact(fp32, out, config, overwrite=args.overwrite)
    finally:
        shutil.rmtree(fp32, ignore_errors=True)


def cmd_export(args: argparse.Namespace) -> int:
    from procrustes_onnx.exporters.pipeline import export_compressed, export_model
    from procrustes_onnx.pipeline_options import quantize_config_from_args

    if args.dense_equivalent and not args.checkpoint:
        raise UserError("--dense-equivalent exports a compressed checkpoint's dense twin: pass --checkpoint CK too")
    if args.dense_equivalent and args.quantize != "none":
        raise UserError("--dense-equivalent writes the input of `rewrite`, which must stay fp32: drop --quantize")
    if args.checkpoint:
        _note_healed_precision(args.checkpoint, quantize_config_from_args(args))
        out = _write_quantized(lambda d: export_compressed(args.checkpoint, d, with_past=not args.no_past,
                                                           dense_equivalent=args.dense_equivalent,
                                                           overwrite=args.overwrite, attention=args.attention),
                               args.out, [args.checkpoint], args)
    else:
        out = _write_quantized(lambda d: export_model(args.model, d, with_past=not args.no_past,
                                                      overwrite=args.overwrite, attention=args.attention),
                               args.out, [], args)
    print(out)
    return 0


def _note_healed_precision(checkpoint: str, config) -> None:
    """A checkpoint healed through one rounding (--heal-quantize) and exported with another loses what that
    healing bought: say so on stderr (it is the user's choice, not an error)."""
    from procrustes_onnx.compiler.heal import healed_precision

    healed = healed_precision(checkpoint)
    wanted = None if config is None else (f"int{config.bits}", config.block_size, config.symmetric)
    if healed is not None and healed != wanted:
        got = "fp32" if wanted is None else f"{wanted[0]} block {wanted[1]}{'' if wanted[2] else ' asymmetric'}"
        print(f"note: {checkpoint} was healed for {healed[0]} block {healed[1]} (--heal-quantize) but is exported "
              f"as {got}: export with --quantize {healed[0]} --quantize-block {healed[1]} to get what it was healed for",
              file=sys.stderr)


def cmd_rewrite(args: argparse.Namespace) -> int:
    from procrustes_onnx.exporters.pipeline import rewrite_model

    print(_write_quantized(lambda d: rewrite_model(args.onnx, args.checkpoint, d, overwrite=args.overwrite),
                           args.out, [args.onnx, args.checkpoint], args))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from procrustes_onnx.exporters.quantize import quantize_artifact
    from procrustes_onnx.pipeline_options import quantize_config_from_args

    config = quantize_config_from_args(args)
    if config is None:
        raise UserError("--quantize none leaves the artifact as it is, nothing to do: use int4 or int8")
    print(quantize_artifact(args.onnx, args.out, config, overwrite=args.overwrite))
    return 0


def add_attention_argument(p: argparse.ArgumentParser) -> None:
    """--attention on export and run: the attention core as one GroupQueryAttention node per layer, or unfused."""
    from procrustes_onnx.exporters.gqa import ATTENTION_CHOICES
    from procrustes_onnx.exporters.onnx_export import DEFAULT_ATTENTION

    p.add_argument("--attention", choices=ATTENTION_CHOICES, default=DEFAULT_ATTENTION,
                   help="gqa: each layer's attention as one com.microsoft GroupQueryAttention node (decode speed; "
                        "no left-padded batches); unfused: the exporter's own ops; auto: gqa where the model "
                        "allows it (Llama-style attention), else unfused (default %(default)s)")


def add_quantize_arguments(p: argparse.ArgumentParser, *, verb: str) -> None:
    """Weight-only quantization flags (ONNX Runtime's MatMulNBits); one spelling on every verb."""
    from procrustes_onnx.exporters.quantize import ALGORITHMS, PRECISIONS, QuantizeConfig

    d = QuantizeConfig()
    default = {"quantize": "int4", "run": None}.get(verb, "none")
    p.add_argument("--quantize", choices=PRECISIONS, default=default,
                   help={"quantize": "precision of the weights (default int4)",
                         "run": "weight-only precision of the extra artifacts (default int4; none: fp32 only)"}.get(
                       verb, "weight-only int4/int8 of every constant-weight MatMul, structured factors included "
                             "(default none: fp32)"))
    p.add_argument("--quantize-block", type=count(16), default=d.block_size, help=f"weights per scale (default {d.block_size})")
    p.add_argument("--quantize-asymmetric", action="store_true", help="a zero point per block (default symmetric)")
    p.add_argument("--quantize-algorithm", choices=ALGORITHMS, default=d.algorithm,
                   help="rtn: round to nearest per block (default); hqq: half-quadratic, asymmetric")
    p.add_argument("--quantize-head", choices=["same", "int8", "int4"], default="same",
                   help="precision of the output head (default: the same as --quantize)")
    p.add_argument("--quantize-accuracy", type=count(0, 4), default=d.accuracy_level,
                   help=f"MatMulNBits accuracy_level (default {d.accuracy_level}: int8 compute on CPU; 0: float)")
    p.add_argument("--quantize-keep", metavar="REGEX",
                   help="constant-weight nodes whose name matches REGEX stay float, e.g. 'shortcut|norm.proj' (the "
                        "residual-path matrices of a per-position rotation)")
    p.add_argument("--no-quantize-embedding", action="store_true",
                   help="keep the token table in float (default: the same precision as the weights)")
    p.add_argument("--no-quantize-pack", action="store_true",
                   help="quantize q/k/v and gate/up as separate MatMuls (default: packed into one each, as "
                        "onnxruntime-genai's builder does; the same numbers, fewer nodes)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from procrustes_onnx.exporters.inspect import format_inspection
    from procrustes_onnx.exporters.pipeline import inspect_model

    info = inspect_model(args.onnx)
    print(json.dumps(info, indent=2, default=str) if args.json else format_inspection(info))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from procrustes_onnx.core.outputs import check_output_file
    from procrustes_onnx.runtime.lm_eval_adapter import run_eval

    if args.limit is not None and not (0 < args.limit <= 1 or float(args.limit).is_integer()):
        raise UserError(f"--limit {args.limit:g} is neither a fraction in (0, 1] nor a whole number of items")
    if args.output:
        folder = os.path.dirname(os.path.abspath(args.onnx)) if args.onnx.endswith(".onnx") else args.onnx
        check_output_file(args.output, inputs=[folder], overwrite=args.overwrite)
    summary = run_eval(args.onnx, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot, threads=args.threads,
                       device=args.device, output=args.output)
    print(json.dumps(summary["results"], indent=2, default=str))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from procrustes_onnx.runtime.generate import generate

    result = generate(args.onnx, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, threads=args.threads, device=args.device)
    print(f"\n[{len(result.token_ids)} tokens, {result.decode_tokens_per_s:.1f} tok/s decode]")
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.compiler.heal import heal_checkpoint
    from procrustes_onnx.core.sources import cache_root
    from procrustes_onnx.pipeline_options import heal_config_from_args

    from procrustes_onnx.compiler.checkpoint import require_checkpoint
    from procrustes_onnx.core.outputs import check_output

    config = heal_config_from_args(args)
    config.validate()  # bad values fail before the models load
    require_checkpoint(args.checkpoint)
    check_output(args.out, inputs=[args.checkpoint, args.model], overwrite=args.overwrite)
    teacher, tokenizer = load_model(args.model)
    from procrustes_onnx.core.outputs import read_identity
    from procrustes_onnx.core.sources import model_fingerprint
    source = (read_identity(args.checkpoint) or {}).get("source")
    if source and source != model_fingerprint(teacher):
        raise UserError(f"--model {args.model} is not the dense model {args.checkpoint} was compressed from (its "
                        "fingerprint differs): pass that model as --model, the teacher healing trains against")
    print(heal_checkpoint(args.checkpoint, args.out, teacher, tokenizer, config, overwrite=args.overwrite,
                          teacher_cache=cache_root() / "heal-teacher"))
    return 0


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """The accuracy-budget flags of `compress` and `run`: measured allocation and --max-loss."""
    p.add_argument("--allocation", choices=["middle", "first", "last", "measured"],
                   help="which matrices give up parameters: by layer order (default middle first), or measured: "
                        "kept shares chosen by each matrix's estimated effect on the loss (shipped only when it "
                        "beats the uniform plan on held-out calibration text)")
    p.add_argument("--max-loss", type=fraction(0, 10, low_open=False, high_open=True),
                   help="instead of --ratio: the largest removal whose perplexity on held-out calibration text stays "
                        "within (1 + F) x dense, e.g. 0.1 (never measured on the evaluation text)")
    p.add_argument("--heldout-samples", type=count(),
                   help="held-out calibration windows that --max-loss and --allocation measured score (default 8)")


def add_fanout_arguments(p: argparse.ArgumentParser, *, default: str = "1: serially, no Ray") -> None:
    """Where the independent solves of `compress` and `run` go (docs/scale.md); the result does not change."""
    p.add_argument("--workers", type=count(1, THREADS_MAX),
                   help=f"solve independent positions and loss ladders N at once on Ray (default {default}); "
                        "needs pip install 'procrustes-onnx[ray]'")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="run them on the Ray cluster at ADDR (e.g. ray://head:10001 or auto) instead of locally")


def add_heal_arguments(p: argparse.ArgumentParser, *, verb: str) -> None:
    """The healing flags; on `heal` the budget is --heal-tokens as well, so one spelling works everywhere."""
    from procrustes_onnx.compiler.heal import DEFAULT_LR, HEAL_MODES, HealConfig

    d = HealConfig()
    from procrustes_onnx.pipeline_options import QUICK_HEAL_TOKENS, RUN_HEAL_TOKENS

    tokens_help = {"heal": f"training tokens (default {d.tokens}; 0: no healing)",
                   "compress": "after compression, heal with this many training tokens against the dense model "
                               "(default 0: none)",
                   "run": f"healing tokens per variant (default {RUN_HEAL_TOKENS}, --quick {QUICK_HEAL_TOKENS}; 0: none)"}[verb]
    p.add_argument("--heal-tokens", type=int, default=d.tokens if verb == "heal" else None, help=tokens_help)
    p.add_argument("--heal-mode", choices=HEAL_MODES, help=f"default {d.mode}: KL to the dense model's (cached "
                   "top-k) next-token distribution; blockwise: layer by layer against the dense layer's output")
    p.add_argument("--heal-text", help=f"training text (default {d.text}; teacher: sampled from the dense model; kjv, "
                   "a file, or jargon@102400: the Jargon File after the evaluation's tokens)")
    p.add_argument("--heal-lr", type=float, help=f"peak learning rate (default {DEFAULT_LR})")
    p.add_argument("--heal-seq-len", type=int, help=f"tokens per training sequence (default {d.seq_len})")
    p.add_argument("--heal-batch-size", type=int, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--heal-epochs", type=int, help=f"passes over the training tokens (default {d.epochs})")
    p.add_argument("--heal-heldout-tokens", type=int, help=f"held-out tokens for early stopping "
                   f"(default {d.heldout_tokens})")
    p.add_argument("--heal-seed", type=int, help="data order seed (default 0)")
    p.add_argument("--heal-quantize", choices=("none", "int4", "int8"),
                   help="e2e: train through the weight rounding of `export --quantize` (default none); export "
                        "with the same --quantize and --quantize-block")
    p.add_argument("--heal-quantize-block", type=int, help=f"its block size (default {d.quantize_block})")


def cmd_run(args: argparse.Namespace) -> int:
    from procrustes_onnx.pipeline import RunOptions, run_pipeline

    run_pipeline(RunOptions.from_args(args))
    return 0


def _model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="alias smollm2-135m (embedded), a Hugging Face folder, a .gguf file, or a hub id (online)")


def _overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace what procrustes-onnx wrote there before (files it did not write are kept)")


def _runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=count(1, THREADS_MAX), default=_THREADS)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="ProcrustesGPT (or SliceGPT) compression into a checkpoint folder")
    _model(p)
    p.add_argument("--out", required=True, help="checkpoint folder to write (resumes if it holds a partial run)")
    _overwrite(p)
    p.add_argument("--config", help="a CompressionConfig JSON file; flags override it")
    p.add_argument("--structure", choices=["kron", "gs"])
    p.add_argument("--structures", help="per-role overrides, e.g. down=gs,q=kron")
    p.add_argument("--ratio", type=fraction(0, 0.9, high_open=True), help="fraction of all parameters removed, as the exported file stores them")
    p.add_argument("--preset", choices=["3/4", "5/8", "1/2", "full"], help="the paper's kept fraction per matrix")
    p.add_argument("--rotation", choices=["global", "per-position"])
    p.add_argument("--method", choices=["frobenius", "weighted", "slicegpt"])
    p.add_argument("--iterations", type=count(0), help="Frobenius ALS iterations (paper: 50)")
    p.add_argument("--calib", help="calibration text: mix (default, docs/texts.md), kjv, jargon@102400, wikitext2 or a file")
    p.add_argument("--calib-samples", type=count())
    p.add_argument("--calib-seq-len", type=count(2))
    p.add_argument("--dense-roles", help="roles kept dense, comma-separated (default: v)")
    p.add_argument("--kept", help="fixed kept share per role, e.g. q=0.375,k=0.375,o=0.5; --ratio is met by the rest")
    p.add_argument("--dense-layers", help="layer indices kept dense, comma-separated, e.g. 0,29")
    p.add_argument("--refine", choices=["none", "sequential", "corrected"],
                   help="after the solve, re-fit each linear on the compressed model's own inputs, layer by layer; "
                        "'corrected' also steers it back to the dense model's outputs")
    p.add_argument("--compress-embeddings", action="store_true",
                   help="low-rank token embedding (a tied head reads the same factors); kept share --kept embed=F, "
                        "default 0.75")
    p.add_argument("--seed", type=count(0, SEED_MAX))
    p.add_argument("--stream", action="store_true",
                   help="read the model from its safetensors shards one decoder layer at a time (memory: a layer, "
                        "not the model); same checkpoint; a global rotation is solved out of core over work files "
                        "(docs/scale.md)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="where the Gram sums and the solves run (default cpu); cuda: the same float64 math on a GPU, "
                        "rounded differently (docs/scale.md)")
    add_budget_arguments(p)
    add_fanout_arguments(p)
    add_heal_arguments(p, verb="compress")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("export", help="Hugging Face model or compressed checkpoint -> ONNX folder (KV cache)")
    _model(p)
    p.add_argument("--checkpoint", help="a compressed checkpoint folder: exports it and rewrites structured MatMuls")
    p.add_argument("--out", required=True)
    _overwrite(p)
    p.add_argument("--dense-equivalent", action="store_true",
                   help="with --checkpoint: write the dense-equivalent export (the input `rewrite` takes)")
    p.add_argument("--no-past", action="store_true", help="logits-only graph, no KV cache")
    add_attention_argument(p)
    add_quantize_arguments(p, verb="export")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("rewrite", help="rewrite an exported dense-equivalent ONNX folder into structured MatMuls")
    p.add_argument("--onnx", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    _overwrite(p)
    add_quantize_arguments(p, verb="rewrite")
    p.set_defaults(func=cmd_rewrite)

    p = sub.add_parser("quantize", help="weight-only int4/int8 of an exported artifact folder (MatMulNBits)")
    p.add_argument("--onnx", required=True, help="an fp32 artifact folder from export or rewrite")
    p.add_argument("--out", required=True)
    _overwrite(p)
    add_quantize_arguments(p, verb="quantize")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="op counts, parameters by kind, bytes, structured vs dense MatMuls")
    p.add_argument("onnx")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("eval", help="lm-eval tasks on an ONNX artifact (local tasks: procrustes_local)")
    p.add_argument("--onnx", required=True)
    p.add_argument("--tasks", default="procrustes_local")
    p.add_argument("--limit", type=fraction(0, float("inf")), help="items per task, or a fraction (0, 1] of them")
    p.add_argument("--num-fewshot", type=count(0))
    p.add_argument("--output", help="a JSON file for the summary")
    _overwrite(p)
    _runtime(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="stream text from an ONNX artifact with the KV cache")
    p.add_argument("--onnx", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=count(), default=64)
    p.add_argument("--temperature", type=fraction(0, float("inf"), low_open=False), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=count(0), default=0)
    p.add_argument("--top-p", type=fraction(0, 1), default=1.0)
    p.add_argument("--seed", type=count(0, SEED_MAX), default=0)
    _runtime(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("heal", help="train a compressed checkpoint against its dense model, keeping its structure")
    p.add_argument("--checkpoint", required=True, help="a compressed checkpoint folder (from compress)")
    p.add_argument("--model", default="smollm2-135m", help="the dense model it was compressed from (the teacher)")
    p.add_argument("--out", required=True, help="healed checkpoint folder to write (a rerun resumes a killed one)")
    _overwrite(p)
    add_heal_arguments(p, verb="heal")
    _runtime(p)
    p.set_defaults(func=cmd_heal)

    p = sub.add_parser("run", help="the main job: compress, export, rewrite, validate, evaluate, benchmark, report")
    _model(p)
    from procrustes_onnx.pipeline_options import add_run_arguments
    add_run_arguments(p)
    add_budget_arguments(p)
    add_fanout_arguments(p, default="one per CPU when Ray is installed, else 1")
    add_heal_arguments(p, verb="run")
    add_quantize_arguments(p, verb="run")
    p.set_defaults(func=cmd_run)
