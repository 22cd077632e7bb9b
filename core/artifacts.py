"""Artifact-folder helpers. ``atomic_output_dir`` (write into a temp sibling, rename when complete, keep
the user's files) lives in ``procrustes_onnx.core.outputs``, the one owner of output-folder safety."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.outputs import atomic_output_dir, file_sha256, read_identity, write_identity

__all__ = ["atomic_output_dir", "write_json", "folder_bytes", "check_external_data", "write_onnx_identity",
           "onnx_identity"]


def write_json(path: Path, data: Any) -> None:
    """Pretty, sorted JSON so artifacts diff cleanly."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def folder_bytes(path: str | os.PathLike) -> int:
    """Total size of the ONNX files (graph + external data) in a folder."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.name.startswith("model.onnx"))


def check_external_data(onnx_path: str | os.PathLike) -> None:
    """Every external-data file an ONNX model names exists beside it and is long enough; else one line
    naming the missing file (ONNX Runtime and onnx_ir would fail later, with a traceback or a vague error).
    Reads the graph only, never the weights."""
    path = Path(onnx_path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all: the loader that runs next says so in its own words
        return
    needed: dict[str, int] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        needed[info.get("location", "")] = max(needed.get(info.get("location", ""), 0), end)
    for location, end in sorted(needed.items()):
        data = path.parent / location
        if not data.is_file():
            raise UserError(f"{path} keeps its weights in {location}, which is missing from {path.parent}: copy "
                            "the whole exported folder, or re-export it")
        if data.stat().st_size < end:
            raise UserError(f"{data} is truncated ({data.stat().st_size:,} of {end:,} bytes): copy it again, or "
                            "re-export the model")


def _onnx_hashes(folder: Path) -> dict[str, str | None]:
    data = folder / "model.onnx.data"
    return {"graph": file_sha256(folder / "model.onnx"), "weights": file_sha256(data) if data.is_file() else None}


def write_onnx_identity(folder: str | os.PathLike, identity: dict) -> dict:
    """identity.json of an exported folder, with the sha256 of its graph and weights files (so a folder
    whose files were swapped after export is told apart from the one the identity describes)."""
    return write_identity(folder, {**identity, **_onnx_hashes(Path(folder))})


def onnx_identity(folder: str | os.PathLike) -> dict | None:
    """The identity of an exported folder (None without one), refused if its files changed since."""
    folder = Path(folder)
    identity = read_identity(folder)
    if identity is None or "graph" not in identity:
        return identity
    if (folder / "model.onnx").is_file():
        check_external_data(folder / "model.onnx")  # a missing file is named as such, not as a change
    if any(identity.get(k) != v for k, v in _onnx_hashes(folder).items()):
        raise UserError(f"{folder} was changed after procrustes-onnx wrote it (model.onnx or model.onnx.data no "
                        "longer match identity.json): export it again")
    return identity
