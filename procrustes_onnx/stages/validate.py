"""Validate: an ONNX folder against the torch model it was exported from (logits on real text, greedy tokens
with the cache), and what its graph holds."""

from __future__ import annotations

from pathlib import Path

from .. import pipeline_measure as measure
from ..cache import cached_json
from . import Artifact, Job, Note

__all__ = ["title", "run"]


def title(source: Artifact, job: Job) -> str:
    return "validate ONNX Runtime vs torch"


def run(source: Artifact, job: Job, out: Path, note: Note) -> Artifact:
    """A quantized copy has no torch model of its own: quantize.json records its check against fp32."""
    if source.kind != "onnx":
        return source
    key = {"a": source.key, "text": job.text_key}
    return source.measured(inspect=measure.inspect(source.path),
                           validation=cached_json(out / f"validate-{source.name}.json", key,
                                                  lambda: measure.validate(source, job.text, job.opts), note))
