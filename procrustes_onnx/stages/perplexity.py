"""Perplexity: an ONNX folder's on the evaluation text in ONNX Runtime (a quantized copy and the reference on
the first windows only: the change from fp32 is what they show)."""

from __future__ import annotations

from pathlib import Path

from .. import pipeline_measure as measure
from ..cache import cached_json
from . import Artifact, Job, Note

__all__ = ["title", "run"]


def title(source: Artifact, job: Job) -> str:
    return f"perplexity on {job.opts.text} ({job.opts.eval_windows or 100} windows, ONNX Runtime)"


def run(source: Artifact, job: Job, out: Path, note: Note) -> Artifact:
    windows = source.windows or job.opts.eval_windows
    key = {"a": source.key, "text": job.text_key, "windows": windows}
    return source.measured(perplexity=cached_json(
        out / f"ppl-{source.name}.json", key, lambda: measure.perplexity(source, job.text, job.opts, windows=windows),
        note))
