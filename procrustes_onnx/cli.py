"""`procrustes-onnx`: one entry point, one verb per stage; each verb parses and calls one library function."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from .cli_args import THREADS_MAX, Parser, count
from procrustes_onnx.core.errors import EXIT_USER_ERROR, UserError

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="alias smollm2-135m (embedded), a Hugging Face folder, a .gguf file, or a hub id (online)")


def cmd_info(args: argparse.Namespace) -> int:
    from .model_info import model_info
    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.core.sources import is_compressed_checkpoint, resolve_model_dir
    from rich.console import Console
    from rich.table import Table

    model, _ = load_model(args.model, tokenizer=False, allow_compressed=True)
    info = model_info(model)
    info["compressed_checkpoint"] = is_compressed_checkpoint(resolve_model_dir(args.model))
    try:
        from procrustes_onnx.compiler.adapters import get_adapter
        get_adapter(model)
        info["compressible"] = "already compressed" if info["compressed_checkpoint"] else True
    except UserError as exc:
        info["compressible"] = str(exc)
    except ImportError:
        info["compressible"] = "compressor not installed"
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    table = Table(title=f"{args.model}")
    table.add_column("field"), table.add_column("value", justify="right")
    for key, value in info.items():
        if key != "parameters_by_kind":
            table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    for kind, n in info["parameters_by_kind"].items():
        table.add_row(f"  params {kind}", f"{n:,}")
    Console().print(table)
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    import torch
    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.core.texts import load_text, tokenize_corpus
    from procrustes_onnx.runtime.perplexity import evaluate_perplexity, make_windows, torch_logits_fn

    if args.max_tokens < args.window + 1:
        raise UserError(f"--max-tokens {args.max_tokens} is shorter than one --window {args.window} (plus the "
                        f"token it predicts): raise --max-tokens or lower --window")
    torch.set_num_threads(args.threads)
    text = load_text(args.text)  # fail on a missing corpus before loading a model
    if args.onnx:
        from procrustes_onnx.runtime.perplexity_ort import max_positions, ort_logits_fn, tokenizer_for_onnx
        _check_window(args.window, max_positions(args.onnx))
        tokenizer = tokenizer_for_onnx(args.onnx)
        logits_fn = ort_logits_fn(args.onnx, threads=args.threads, device=args.device)
    else:
        model, tokenizer = load_model(args.model, allow_compressed=True)
        _check_window(args.window, getattr(model.config, "max_position_embeddings", None))
        logits_fn = torch_logits_fn(model)
    tokens = tokenize_corpus(tokenizer, text, args.max_tokens)
    windows = make_windows(tokens, args.window, args.max_tokens, args.max_windows)
    result = evaluate_perplexity(logits_fn, windows, batch_size=args.batch_size)
    print(json.dumps(result.to_dict(), indent=2) if args.json else
          f"ppl {result.ppl:.3f}  nll {result.nll:.4f}  tokens scored {result.tokens_scored:,}  "
          f"windows {result.windows}  {result.tokens_per_s:,.0f} tok/s")
    return 0


def _check_window(window: int, max_len: int | None) -> None:
    if max_len and window > max_len:
        raise UserError(f"--window {window} exceeds the model's {max_len} positions: use {max_len} or less")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="procrustes-onnx", description=(
        "Compress a causal LM with ProcrustesGPT (Kronecker / Group-and-Shuffle weights), export it to ONNX "
        "with structured MatMuls, and validate and benchmark it in ONNX Runtime."))
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("info", help="architecture, dimensions and parameters by kind")
    _add_model(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ppl", help="perplexity on the evaluation protocol (torch, or an ONNX artifact)")
    _add_model(p)
    p.add_argument("--onnx", help="an exported artifact folder or model.onnx instead of --model")
    p.add_argument("--text", default="jargon", help="jargon (default), kjv, wikitext2, or a UTF-8 text file")
    p.add_argument("--window", type=count(2), default=1024)
    p.add_argument("--max-tokens", type=count(), default=102_400)
    p.add_argument("--max-windows", type=count(), default=None)
    p.add_argument("--batch-size", type=count(), default=1)
    p.add_argument("--threads", type=count(1, THREADS_MAX), default=os.cpu_count() or 2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ppl)

    from . import cli_stages
    cli_stages.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("PROCRUSTES_ONLINE") != "1":  # nothing reaches a hub unless asked to
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(var, "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a full disk, from Python or from a library's own writer (safetensors, onnx)
        if not _disk_full(exc):
            raise
        print(f"error: no space left on device ({type(exc).__name__}): free disk space, or write --out elsewhere, and "
              "run the same command again (outputs are written whole or not at all; a compression resumes from its "
              "work folder)", file=sys.stderr)
        return EXIT_USER_ERROR


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC anywhere in the exception's chain, as an OSError or in a library error's message."""
    while exc is not None:
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
