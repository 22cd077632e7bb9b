"""Artifact-folder helpers: write into a temp sibling and rename when complete, so a crash never
leaves a half-written model where a reader would pick it up."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from procrustes_onnx.errors import UserError

__all__ = ["atomic_output_dir", "write_json", "folder_bytes"]


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder next to ``out_dir``; on success it replaces ``out_dir``, on error it is removed."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder; pass a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} is not empty; choose another path or pass overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Pretty, sorted JSON so artifacts diff cleanly."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def folder_bytes(path: str | os.PathLike) -> int:
    """Total size of the ONNX files (graph + external data) in a folder."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.name.startswith("model.onnx"))
