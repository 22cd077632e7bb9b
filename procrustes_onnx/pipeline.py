"""The main job (`procrustes-onnx run`): compress, heal, export, quantize, validate, evaluate, benchmark, report.

Every stage can run alone through its CLI verb; here each is a module of `procrustes_onnx.stages`, cached by
the content hash of its inputs, so an interrupted run resumes where it stopped and a finished one is not
redone. This module is the driver: the hops, their headers and the report."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

from procrustes_onnx.runtime.benchmark import peak_rss_mib

from .pipeline_options import RunOptions
from .report import write_report
from .stages import Artifact, Job, benchmark, compress, export, heal, perplexity, quantize, tasks, validate

__all__ = ["run_pipeline"]


class _Clock:
    """Stage headers with elapsed time and a naive ETA from the stages done so far; per stage its seconds and the
    process's peak resident memory when it ended (a high-water mark: the stage where it rises set it)."""

    def __init__(self, total: int) -> None:
        self.start, self.total, self.done, self.times, self.peaks = time.perf_counter(), total, 0, {}, {}
        self._name, self._t, self._reused = None, None, False

    def note(self, message: str) -> None:
        """Echo a cache message; a stage whose outputs were all reused is reported as such."""
        print(message, flush=True)
        self._reused = self._reused or message.lstrip().startswith("reuse")

    def stage(self, name: str) -> None:
        self._close()
        self._name, self._t = name, time.perf_counter()
        elapsed = self._t - self.start
        eta = f", ETA {elapsed / self.done * (self.total - self.done) / 60:.1f} min" if self.done else ""
        print(f"[{self.done + 1}/{self.total}] {name}  (elapsed {elapsed / 60:.1f} min{eta})", flush=True)

    def _close(self) -> None:
        if self._name is not None:
            seconds = round(time.perf_counter() - self._t, 1)
            self.times[self._name] = f"{seconds} (reused earlier output)" if self._reused else seconds
            self.peaks[self._name] = round(peak_rss_mib() / 1024, 2)
            self.done += 1
            self._name, self._reused = None, False

    def finish(self) -> dict:
        self._close()
        return {"stages_s": self.times, "peak_rss_gib": self.peaks, "total_s": round(time.perf_counter() - self.start, 1)}


def _results(shipped: list[Artifact]) -> tuple[dict, dict | None]:
    """What write_report reads: per fp32 folder its measurements, its quantized copy's and its checkpoint's;
    and the reference point's."""
    results = {a.name: {"path": str(a.path), **a.results} for a in shipped if a.kind == "onnx"}
    reference = None
    for a in shipped:
        if a.kind == "quantized":
            results[a.origin.name]["quantized"] = {**a.results, "windows": a.windows}
        elif a.kind == "reference":
            reference = {**a.results, "windows": a.windows}
    for a in shipped:
        if a.kind == "onnx" and a.origin.kind == "checkpoint":
            results[a.name].update(a.origin.results)  # compression, and healing where healed
    return results, reference


def run_pipeline(opts: RunOptions) -> Path:
    """The hops of docs/design.md: each stage reads the artifacts the one before made."""
    compress.check_variants(opts.variants)
    healing = opts.heal is not None and opts.heal.tokens > 0
    clock = _Clock(total=4 + (3 if healing else 2) * len(opts.variants) + (2 if opts.evaluate else 0)
                   + (1 if opts.benchmark else 0) + (1 if opts.quantize is not None else 0))
    clock.stage(f"model {opts.model}")
    job = Job.start(opts)
    out = Path(opts.out)

    def each(stage: ModuleType, sources: list[Artifact], folder: Path) -> list[Artifact]:
        """The stage on each source, under a header of its own."""
        made = []
        for source in sources:
            clock.stage(stage.title(source, job))
            made.append(stage.run(source, job, folder, clock.note))
        return made

    def every(stage: ModuleType, sources: list[Artifact], folder: Path) -> list[Artifact]:
        """The stage on every source under one header (a stage with nothing to make returns None)."""
        clock.stage(stage.title(sources[0], job))
        return [a for a in (stage.run(s, job, folder, clock.note) for s in sources) if a is not None]

    checkpoints = each(compress, [replace(job.model, name=v) for v in opts.variants], job.work)
    if healing:
        checkpoints = each(heal, checkpoints, job.work)
    shipped = each(export, [job.model, *checkpoints], out)
    if opts.quantize is not None:  # and onnxruntime-genai's model at the same precision, the point to beat
        shipped += every(quantize, [*shipped, job.model] if opts.reference else shipped, out)
    measuring = [validate, *([perplexity, tasks] if opts.evaluate else []), *([benchmark] if opts.benchmark else [])]
    for stage in measuring:
        shipped = every(stage, shipped, job.work / "results")
    clock.stage("report")
    timing = clock.finish()
    results, reference = _results(shipped)
    report = write_report(out, results, opts, timing, reference=reference)
    print(f"done in {timing['total_s'] / 60:.1f} min: {report}")
    return report
