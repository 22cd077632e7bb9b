"""Benchmark: an ONNX folder's prefill latency and decode speed in ONNX Runtime on this machine."""

from __future__ import annotations

from pathlib import Path

from .. import pipeline_measure as measure
from . import Artifact, Job, Note

__all__ = ["title", "run"]


def title(source: Artifact, job: Job) -> str:
    return "benchmark prefill and decode (ONNX Runtime CPU)"


def run(source: Artifact, job: Job, out: Path, note: Note) -> Artifact:
    """Never cached (``out`` unused): timings describe this run's machine."""
    return source.measured(benchmark=measure.benchmark(source, job.opts))
