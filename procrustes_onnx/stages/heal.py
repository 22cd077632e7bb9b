"""Heal: a compressed checkpoint -> the same structure trained against the dense model (`compiler.heal`), scored
before and after on the evaluation text."""

from __future__ import annotations

from pathlib import Path

from procrustes_onnx.compiler.checkpoint import load_model
from procrustes_onnx.compiler.heal import heal_checkpoint
from procrustes_onnx.core.sources import cache_root

from .. import pipeline_measure as measure
from ..cache import cached_dir, cached_json, content_hash
from . import Artifact, Job, Note

__all__ = ["title", "run"]


def title(source: Artifact, job: Job) -> str:
    heal = job.opts.heal
    return f"heal {source.name} ({heal.tokens:,} {heal.text} tokens, {heal.mode})"


def _heal(checkpoint: Artifact, job: Job, out: Path) -> None:
    teacher, tokenizer = load_model(str(checkpoint.origin.path))
    heal_checkpoint(checkpoint.path, out, teacher, tokenizer, job.opts.heal,
                    teacher_cache=cache_root() / "heal-teacher",
                    overwrite=True)  # a stage folder of this run's own (a killed rerun may find it unmarked)


def run(source: Artifact, job: Job, out: Path, note: Note) -> Artifact:
    key = {"checkpoint": source.key, "heal": job.opts.heal.settings()}
    healed = cached_dir(out / f"{source.name}-{content_hash(key)}-healed", key, lambda d: _heal(source, job, d), note)
    scores = cached_json(out / "results" / f"heal-{source.name}.json", {**key, "text": job.text_key},
                         lambda: measure.heal_scores(source.path, healed, job.text, job.opts), note)
    return Artifact(source.name, "checkpoint", healed, content_hash(key), origin=source, config=source.config,
                    results={**source.results, "healing": scores})
