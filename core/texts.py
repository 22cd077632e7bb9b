"""Text sources for evaluation and calibration, and the cleaning rules that make them reproducible.

Cleaning (documented in docs/texts.md): lines made only of rules/box-drawing characters are dropped,
every line is stripped, wrapped lines are joined into paragraphs with single spaces, and paragraphs
are separated by one blank line. For the KJV, verse numbers are removed and each chapter is one
paragraph under a "Book N" heading."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path

from .errors import UserError

__all__ = ["TEXT_SOURCES", "JARGON_PATH", "MIX_SOURCES", "load_text", "clean_paragraphs", "tokenize_corpus"]

JARGON_PATH = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
KJV_RANGE = "gen1:1-rev22:21"
TEXT_SOURCES = ("jargon", "kjv", "mix", "wikitext2")
#: the modern technical prose of `mix` (Debian package -> its plain-text files); KJV is added at one chapter in 4
MIX_SOURCES = {
    "debian-reference-en": ("/usr/share/debian-reference/debian-reference.en.txt.gz",),
    "gnu-standards": ("/usr/share/doc/gnu-standards/standards.text.gz", "/usr/share/doc/gnu-standards/maintain.text.gz"),
    "python3-doc": tuple(f"/usr/share/doc/python3/html/_sources/{part}" for part in
                         ("tutorial", "howto", "faq", "reference", "using", "extending")),
}
_RULE_LINE = re.compile(r"^[\s\u2500-\u257f\-=_*~.^#+|]*$")
_RST_MARKUP = re.compile(r"^\s*(\.\. |:[a-z-]+:\s)")  # reST directives and field lists: markup, not prose
_VERSE_NUMBER = re.compile(r"^\s*\d+\s+")
_CHAPTER_HEADING = re.compile(r"^[1-3]?\s?[A-Z][A-Za-z ]+ \d+$")


def clean_paragraphs(lines: list[str]) -> str:
    """Join wrapped lines into paragraphs; drop rule lines; collapse whitespace."""
    paragraphs, current = [], []
    for line in lines:
        line = " ".join(line.split())
        if not line or _RULE_LINE.match(line):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(line)
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _jargon() -> str:
    if not JARGON_PATH.is_file():
        raise UserError(f"the Jargon File is missing ({JARGON_PATH}): `apt-get install jargon-text`, or pass "
                        "--text FILE with any UTF-8 text")
    with gzip.open(JARGON_PATH, "rt", encoding="utf-8") as f:
        return clean_paragraphs(f.read().splitlines())


def _kjv() -> str:
    if shutil.which("bible") is None:
        raise UserError("the KJV text is missing (no `bible` command): `apt-get install bible-kjv bible-kjv-text`, "
                        "or pass --calib FILE with any UTF-8 text")
    out = subprocess.run(["bible", KJV_RANGE], capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        raise UserError(f"`bible {KJV_RANGE}` failed ({out.stderr.strip()[:80]}): reinstall bible-kjv-text")
    chapters, heading, verses = [], None, []
    for line in out.stdout.splitlines():
        stripped = line.strip()
        if _CHAPTER_HEADING.match(stripped) and not line.startswith(" "):
            if heading and verses:
                chapters.append(f"{heading}\n\n" + " ".join(verses))
            heading, verses = stripped, []
        elif stripped:
            verses.append(" ".join(_VERSE_NUMBER.sub("", line).split()))
    if heading and verses:
        chapters.append(f"{heading}\n\n" + " ".join(verses))
    return "\n\n".join(chapters)


def _read_maybe_gzip(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    return path.read_text(encoding="utf-8", errors="replace")


def _mix() -> str:
    """Modern technical prose (Debian Reference, GNU coding standards, the Python tutorial/HOWTOs/FAQ/
    language reference) plus every fourth KJV chapter: a calibration and healing text that is neither
    archaic nor the evaluation text. Sources are interleaved in blocks of a few thousand characters, so that a
    window of text reads one passage and the whole is evenly mixed."""
    missing = [pkg for pkg, paths in MIX_SOURCES.items() if not any(Path(p).exists() for p in paths)]
    if missing:
        raise UserError(f"the mix text needs Debian packages {', '.join(missing)}: `apt-get install "
                        f"{' '.join(missing)}` (or `make run`, which installs them), or pass a text file")
    streams: list[list[str]] = []
    for paths in MIX_SOURCES.values():
        files: list[Path] = []
        for p in map(Path, paths):
            files.extend(sorted(p.rglob("*.rst.txt")) if p.is_dir() else [p] if p.is_file() else [])
        lines = [line for f in files for line in _read_maybe_gzip(f).splitlines() if not _RST_MARKUP.match(line)]
        streams.append(_blocks([p for p in clean_paragraphs(lines).split("\n\n") if len(p) > 40]))
    streams.append(_blocks(_kjv().split("\n\n")[1::2][::4]))  # chapter bodies (headings dropped), one in four
    mixed, longest = [], max(map(len, streams))
    for i in range(longest):  # round-robin, each stream stretched to the longest one's length
        for stream in streams:
            mixed.extend(stream[i * len(stream) // longest: (i + 1) * len(stream) // longest])
    return "\n\n".join(mixed)


def _blocks(paragraphs: list[str], size: int = 4000) -> list[str]:
    """Consecutive paragraphs joined into blocks of about ``size`` characters: the unit `mix` interleaves,
    long enough that a training window mostly reads one coherent passage."""
    blocks, current, n = [], [], 0
    for p in paragraphs:
        current.append(p)
        n += len(p)
        if n >= size:
            blocks.append("\n\n".join(current))
            current, n = [], 0
    if current:
        blocks.append("\n\n".join(current))
    return blocks


def _wikitext2() -> str:
    try:
        from datasets import load_dataset
        data = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # offline, or datasets missing: both are the user's to fix
        raise UserError(f"wikitext2 is not available here ({type(exc).__name__}): it needs `datasets` and a "
                        "network; use jargon, kjv or a text file") from None
    return "\n\n".join(data["text"])


def load_text(name: str) -> str:
    """`jargon`, `kjv`, `mix`, `wikitext2`, or the path of a UTF-8 text file (used as is)."""
    loaders = {"jargon": _jargon, "kjv": _kjv, "mix": _mix, "wikitext2": _wikitext2}
    if name in loaders:
        return loaders[name]()
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"text source {name!r} is neither {', '.join(TEXT_SOURCES)} nor an existing file: check "
                        "the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: convert it (iconv -t utf-8) or pick another file") from None
    if not text.strip():
        raise UserError(f"{path} is empty: pass a file with text in it")
    return text


def tokenize_corpus(tokenizer, text: str, max_tokens: int | None = None):
    """Token ids of the whole text as one LongTensor, no BOS (the protocol scores raw text)."""
    import torch

    if max_tokens is not None:
        text = text[: max_tokens * 12]  # no tokenizer averages more than ~12 characters a token
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)
    return ids
