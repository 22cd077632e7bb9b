"""Quantize: every ONNX artifact -> its weight-only copy beside it, `<artifact>-int4` (`exporters.quantize`, ONNX
Runtime's MatMulNBits); the dense model -> onnxruntime-genai's builder model at the same precision, the
reference point to beat (`procrustes_onnx.reference`), where the builder is installed."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from procrustes_onnx.exporters.quantize import quantize_artifact
from procrustes_onnx.runtime.benchmark import bytes_on_disk

from .. import pipeline_measure as measure
from ..cache import cached_dir, content_hash
from ..pipeline_options import QUANT_WINDOWS
from ..reference import build_reference
from . import Artifact, Job, Note
from .export import write_readme

__all__ = ["title", "run"]


def title(source: Artifact, job: Job) -> str:
    return f"quantize every artifact ({job.opts.quantize.name}, ONNX Runtime MatMulNBits)"


def _windows(job: Job) -> int:
    """Only the first perplexity windows: the change from fp32 is what they show."""
    return min(job.opts.eval_windows or QUANT_WINDOWS, QUANT_WINDOWS)


def _reference(source: Artifact, job: Job) -> Artifact | None:
    q = job.opts.quantize
    name = f"genai-builder-{q.name}-{source.key}"
    folder = build_reference(source.path, job.work / name, q.name)
    if folder is None:
        return None
    label = f"onnxruntime-genai builder {q.name}"
    return Artifact("reference", "reference", folder, name, origin=source, windows=_windows(job),
                    results={"label": label, "path": str(folder), "bytes": bytes_on_disk(folder)})


def run(source: Artifact, job: Job, out: Path, note: Note) -> Artifact | None:
    """None where there is nothing to make: the reference without onnxruntime-genai."""
    if source.kind == "model":
        return _reference(source, job)
    q = job.opts.quantize
    key = {"a": source.key, "quantize": asdict(q)}

    def build(d: Path) -> None:
        quantize_artifact(source.path, d, q, overwrite=True)
        write_readme(d, f"{job.opts.model}, {source.name}, weight-only {q.name}",
                     {"quantized from": source.path.name, "quantization": asdict(q)})
    folder = cached_dir(out / f"{source.path.name}-{q.name}", key, build, note)
    return Artifact(f"{source.name}-{q.name}", "quantized", folder, content_hash(key), origin=source,
                    windows=_windows(job), results={**measure.quantize_summary(folder), "path": str(folder)})
