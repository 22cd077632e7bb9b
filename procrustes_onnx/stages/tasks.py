"""Tasks: an ONNX folder's zero-shot scores on the local lm-eval tasks, in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

from .. import pipeline_measure as measure
from ..cache import cached_json
from . import Artifact, Job, Note

__all__ = ["title", "run"]


def title(source: Artifact, job: Job) -> str:
    return "zero-shot local tasks (lm-eval, ONNX Runtime)"


def run(source: Artifact, job: Job, out: Path, note: Note) -> Artifact:
    """The fp32 folders only: a quantized copy is compared on perplexity."""
    if source.kind != "onnx":
        return source
    key = {"a": source.key, "limit": job.opts.task_limit, "tasks": list(job.opts.tasks)}
    return source.measured(tasks=cached_json(out / f"tasks-{source.name}.json", key,
                                             lambda: measure.tasks(source, job.opts), note))
