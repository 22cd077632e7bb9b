"""Stage caching for the main job: a stage's output is reused when the content hash of its inputs matches."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from procrustes_onnx.core.outputs import FILE_LIST, register, user_files

__all__ = ["content_hash", "folder_hash", "cached_dir", "cached_json"]

log = logging.getLogger(__name__)
_MARKER = ".stage.json"


def content_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def folder_hash(path: Path) -> str:
    """sha256 over the names and bytes of every file in a folder (stage markers excluded)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name not in (_MARKER, FILE_LIST)):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _marker_key(path: Path) -> str | None:
    try:
        return json.loads((path / _MARKER).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def cached_dir(out: Path, key: dict, build: Callable[[Path], Any], echo: Callable[[str], None] = print) -> Path:
    """Run `build(out)` unless `out` already holds the output of the same inputs; mark it when done.

    `build` must write `out` atomically (temp + rename), so a killed run leaves no marker and is redone."""
    out = Path(out)
    digest = content_hash(key)
    if out.is_dir() and _marker_key(out) == digest:
        echo(f"  reuse {out} (inputs unchanged, {digest})")
        return out
    start = time.perf_counter()
    users = user_files(out)
    build(out)
    (out / _MARKER).write_text(json.dumps({"key": digest, "inputs": key, "seconds": time.perf_counter() - start},
                                          default=str, indent=1))
    register(out, [f for f in user_files(out) if f not in users])  # files written after the atomic build too
    return out


def cached_json(path: Path, key: dict, compute: Callable[[], dict], echo: Callable[[str], None] = print) -> dict:
    """Like `cached_dir` for a JSON result file."""
    path = Path(path)
    digest = content_hash(key)
    try:
        stored = json.loads(path.read_text())
        if stored.get("_key") == digest:
            echo(f"  reuse {path.name} (inputs unchanged)")
            return stored
    except (OSError, ValueError):
        pass
    result = {**compute(), "_key": digest}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)
    return result
