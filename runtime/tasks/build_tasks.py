"""Build the offline lm-eval tasks' data from the public-domain corpora (deterministic; see docs/tasks.md).

    python -m procrustes_onnx.runtime.tasks.build_tasks      # rewrites runtime/tasks/*.jsonl

Cloze items: a context of 2-3 consecutive sentences from one paragraph, the real next sentence, and three
distractor sentences of similar length drawn from other paragraphs of the same corpus. Passages: paragraph-
aligned chunks of about 1,500 characters at evenly spaced places in the corpus, for rolling perplexity.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from procrustes_onnx.core.texts import load_text

__all__ = ["split_sentences", "cloze_items", "passages", "build", "TASK_DIR"]

TASK_DIR = Path(__file__).resolve().parent
SEED = 20240607
CLOZE_ITEMS = 400
PASSAGES = 60
PASSAGE_CHARS = 1500
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\u201c\"(])")
_MIN_CHARS, _MAX_CHARS = 30, 240


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one cleaned paragraph (a period, ! or ? followed by a capital or an opening quote)."""
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def _usable(sentence: str) -> bool:
    return _MIN_CHARS <= len(sentence) <= _MAX_CHARS and not sentence.startswith(":")


def cloze_items(text: str, n: int, seed: int = SEED) -> list[dict]:
    """`n` four-way "which continuation is real" items; the gold index is uniform over 0..3."""
    rng = random.Random(seed)
    paragraphs = [split_sentences(p) for p in text.split("\n\n")]
    pool = [(i, s) for i, sents in enumerate(paragraphs) for s in sents if _usable(s)]
    candidates = [(i, j) for i, sents in enumerate(paragraphs) for j in range(2, len(sents))
                  if all(_usable(s) for s in sents[j - 2: j + 1])]
    rng.shuffle(candidates)
    items: list[dict] = []
    for i, j in candidates:
        if len(items) == n:
            break
        sents = paragraphs[i]
        k = 3 if j >= 3 and _usable(sents[j - 3]) and rng.random() < 0.5 else 2
        gold = sents[j]
        similar = [s for p, s in rng.sample(pool, min(400, len(pool)))
                   if p != i and 0.7 * len(gold) <= len(s) <= 1.3 * len(gold) and s != gold]
        if len(similar) < 3:
            continue
        choices = similar[:3]
        label = rng.randrange(4)
        choices.insert(label, gold)
        items.append({"id": len(items), "paragraph": i, "context": " ".join(sents[j - k: j]),
                      "choices": choices, "label": label})
    return items


def passages(text: str, n: int, chars: int = PASSAGE_CHARS) -> list[dict]:
    """`n` paragraph-aligned chunks of about `chars` characters at evenly spaced offsets."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    out: list[dict] = []
    for k in range(n):
        start = k * len(paragraphs) // n
        chunk: list[str] = []
        for p in paragraphs[start:]:
            chunk.append(p)
            if sum(map(len, chunk)) >= chars:
                break
        body = "\n\n".join(chunk)
        if len(body) > 2 * chars:  # one huge paragraph (a KJV chapter): cut at a sentence end
            cut = body.rfind(". ", 0, 2 * chars)
            body = body[: cut + 1] if cut > 0 else body[: 2 * chars]
        out.append({"id": k, "paragraph": start, "text": body})
    return out


def _write(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def build(out_dir: Path = TASK_DIR) -> dict[str, int]:
    """Write {jargon,kjv}_cloze.jsonl and {jargon,kjv}_passages.jsonl; returns rows per file."""
    counts = {}
    for corpus in ("jargon", "kjv"):
        text = load_text(corpus)
        for kind, rows in (("cloze", cloze_items(text, CLOZE_ITEMS)), ("passages", passages(text, PASSAGES))):
            _write(rows, out_dir / f"{corpus}_{kind}.jsonl")
            counts[f"{corpus}_{kind}"] = len(rows)
    return counts


if __name__ == "__main__":
    print(build())
