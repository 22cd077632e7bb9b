"""Compress: the dense model -> one variant's compressed checkpoint in .work/ (`compiler.compress`)."""

from __future__ import annotations

from pathlib import Path

from procrustes_onnx.compiler.checkpoint import load_model
from procrustes_onnx.compiler.compress import compress
from procrustes_onnx.compiler.config import CompressionConfig
from procrustes_onnx.core.errors import UserError

from .. import pipeline_measure as measure
from ..cache import cached_dir, content_hash
from ..pipeline_options import VARIANTS, RunOptions
from . import Artifact, Job, Note

__all__ = ["title", "run", "check_variants", "compression_config", "compress_folder"]


def check_variants(variants: list[str]) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")


def compression_config(opts: RunOptions, variant: str) -> CompressionConfig:
    """The variant's settings, then the run's solver settings, then the flags given (SliceGPT: no solver)."""
    overrides = {"ratio": opts.ratio, "rotation": opts.rotation, "calib_samples": opts.calib_samples,
                 "calib_seq_len": opts.calib_seq_len, "iterations": opts.iterations, "calib_text": opts.calib}
    base = CompressionConfig().to_dict()
    base.update(VARIANTS[variant])
    if VARIANTS[variant].get("method") != "slicegpt":
        base.update(opts.solver, workers=opts.workers, ray_address=opts.ray_address)
    base.update({k: v for k, v in overrides.items() if v is not None})
    if VARIANTS[variant].get("method") != "slicegpt":  # the accuracy budget is a ProcrustesGPT setting
        budget = {"allocation": opts.allocation, "max_loss": opts.max_loss, "heldout_samples": opts.heldout_samples}
        base.update({k: v for k, v in budget.items() if v is not None})
        if opts.max_loss is not None:
            base["ratio"] = None
    return CompressionConfig.from_dict(base)


def compress_folder(model_dir: Path, config: CompressionConfig, out: Path) -> None:
    """A Hugging Face folder -> a compressed checkpoint in ``out`` (benchmarks/healing.py makes its own so)."""
    model, tokenizer = load_model(str(model_dir))
    compress(model, tokenizer, config, out)


def title(source: Artifact, job: Job) -> str:
    config = compression_config(job.opts, source.name)
    return f"compress {source.name} " + (f"at {config.ratio:.0%} removed" if config.max_loss is None
                                         else f"within --max-loss {config.max_loss:g}")


def run(source: Artifact, job: Job, out: Path, note: Note) -> Artifact:
    """``source``: the dense model, named for the variant to make."""
    config = compression_config(job.opts, source.name)
    key = {"model": source.key, "config": config.settings()}  # --workers and --ray-address change no result
    # one folder per configuration: a partial run of other settings is never clobbered or mixed in
    folder = cached_dir(out / f"{source.name}-{content_hash(key)}", key,
                        lambda d: compress_folder(source.path, config, d), note)
    return Artifact(source.name, "checkpoint", folder, content_hash(key), origin=source, config=config.settings(),
                    results={"compression": measure.compression_summary(folder)})
