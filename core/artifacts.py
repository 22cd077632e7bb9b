"""Artifact-folder helpers, the one owner of each: which folder or model.onnx a path means, loading it with
one-line errors, its bytes on disk, its external data, its identity. ``atomic_output_dir`` (write into a
temp sibling, rename when complete, keep the user's files) lives in ``core.outputs``, re-exported here.

Every layer that reads an artifact uses these: the exporters, and the ORT runtime (which imports no torch,
so this module must not either)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from .errors import UserError
from .outputs import atomic_output_dir, file_sha256, read_identity, write_identity

__all__ = ["atomic_output_dir", "write_json", "SIDE_FILES", "artifact_folder", "source_folder", "model_file",
           "load_onnx", "onnx_files", "folder_bytes", "check_external_data", "write_onnx_identity", "onnx_identity"]

SIDE_FILES = ("config.json", "generation_config.json", "export.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")


def write_json(path: Path, data: Any) -> None:
    """Pretty, sorted JSON so artifacts diff cleanly."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def artifact_folder(path: str | os.PathLike) -> Path:
    """The folder of an artifact given as the folder or as its .onnx file."""
    path = Path(path)
    return path.parent if path.suffix == ".onnx" else path


def source_folder(onnx_in: str | os.PathLike) -> Path:
    """An artifact folder (or its model.onnx) that a stage reads: it holds model.onnx and its external data."""
    src = artifact_folder(onnx_in)
    if not (src / "model.onnx").is_file():
        raise UserError(f"{onnx_in} has no model.onnx: pass a folder written by `procrustes-onnx export` or `rewrite`")
    check_external_data(src / "model.onnx")
    return src


def model_file(path: str | os.PathLike) -> Path:
    """An exported folder or its model.onnx -> the model.onnx, which exists with all its external data."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass an exported folder or its model.onnx")
    check_external_data(path)
    return path


def load_onnx(path: str | os.PathLike) -> ir.Model:
    """``ir.load`` with a one-line UserError for files that are not ONNX (or lack their external data)."""
    try:
        return ir.load(path)
    except Exception as exc:  # protobuf raises DecodeError, missing data raises OSError: both mean bad input
        raise UserError(f"{path} is not a readable ONNX model ({type(exc).__name__}); re-export it") from None


def onnx_files(onnx_path: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk of an ONNX file and of its external data beside it (the files named after it)."""
    path = Path(onnx_path)
    return {p.name: p.stat().st_size for p in sorted(path.parent.iterdir())
            if p.is_file() and p.name.startswith(path.name)}


def folder_bytes(path: str | os.PathLike) -> int:
    """Total size of the ONNX files (graph + external data) in a folder."""
    return sum(onnx_files(Path(path) / "model.onnx").values())


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
