"""Loaders and scoring for the offline lm-eval tasks in this folder (the YAML files point here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["TASK_DIR", "LOCAL_TASKS", "load_rows", "jargon_cloze", "kjv_cloze", "jargon_passages", "kjv_passages",
           "process_passage"]

TASK_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("jargon_cloze", "kjv_cloze", "jargon_ppl", "kjv_ppl")


def load_rows(name: str) -> list[dict]:
    """Rows of `<name>.jsonl`, built by build_tasks.py and shipped as package data."""
    path = TASK_DIR / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dataset(name: str) -> dict:
    import datasets

    return {"test": datasets.Dataset.from_list(load_rows(name))}


def jargon_cloze(**_) -> dict:
    return _dataset("jargon_cloze")


def kjv_cloze(**_) -> dict:
    return _dataset("kjv_cloze")


def jargon_passages(**_) -> dict:
    return _dataset("jargon_passages")


def kjv_passages(**_) -> dict:
    return _dataset("kjv_passages")


def process_passage(doc: dict, results: list) -> dict:
    """Word/byte perplexity and bits per byte of one passage, as lm-eval's wikitext task scores them."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    size = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}
