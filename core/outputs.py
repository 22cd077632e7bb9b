"""Output folders that never lose a user's data: path checks before any work, atomic writes, a file list.

Every folder the tool writes holds ``.procrustes-files.json``, the list of files the tool wrote there.
Replacing a folder (``--overwrite``) replaces only those; any other file in it is the user's and stays.
A folder is built in a temporary sibling and renamed into place when complete, so a crash never leaves a
half-written model where a reader would pick it up. ``identity.json`` says what a folder is (format,
kind, source model fingerprint, structure hash), so a verb can check that it was given what it needs.

Core: it imports only ``procrustes_onnx.core.errors``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError

__all__ = ["FILE_LIST", "IDENTITY", "check_output", "check_output_file", "atomic_output_dir", "read_file_list",
           "register", "claim", "tool_owned", "user_files", "write_identity", "read_identity", "identity_id", "file_sha256"]

FILE_LIST = ".procrustes-files.json"
IDENTITY = "identity.json"
_STAGE_MARKER = ".stage.json"  # procrustes_onnx.cache's marker: a folder holding it (and no file list) is a
                               # stage folder of `run` written before file lists existed: all of it is ours


def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _files(folder: Path) -> list[str]:
    """Relative paths of every file under ``folder`` (links included, not followed), sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def read_file_list(folder: str | os.PathLike) -> dict | None:
    """The file list of a folder the tool wrote, or None (no file list, or one that is not ours)."""
    try:
        data = json.loads((Path(folder) / FILE_LIST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


def _write_file_list(folder: Path, files: Iterable[str], partial: bool = False) -> None:
    data = {"tool": "procrustes-onnx", "files": sorted(set(files) - {FILE_LIST}), "partial": partial}
    tmp = folder / f"{FILE_LIST}.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / FILE_LIST)


def tool_owned(folder: str | os.PathLike) -> set[str]:
    """Entries (files, or folders meaning everything under them) that the tool wrote into ``folder``."""
    folder = Path(folder)
    listed = read_file_list(folder)
    if listed is not None:
        return set(listed["files"])
    if (folder / _STAGE_MARKER).is_file():
        return set(_files(folder))
    return set()


def _owned(rel: str, owned: set[str]) -> bool:
    parts = Path(rel).parts
    return any(str(Path(*parts[:i])) in owned for i in range(1, len(parts) + 1))


def user_files(folder: str | os.PathLike) -> set[str]:
    """Files in ``folder`` that the tool did not write (none if it does not exist): never replaced."""
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    owned = tool_owned(folder)
    return {f for f in _files(folder) if f != FILE_LIST and not _owned(f, owned)}


def register(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Add files the tool wrote into an existing folder (after its atomic write) to the folder's file list."""
    folder = Path(folder)
    listed = read_file_list(folder) or {"files": [], "partial": False}
    _write_file_list(folder, [*listed["files"], *names], bool(listed.get("partial")))


def claim(folder: str | os.PathLike, names: Iterable[str]) -> Path:
    """Mark ``names`` in ``folder`` (created if need be) as the tool's resumable state, e.g. compress's
    ``work/``: a rerun of the same command may then resume in the folder without ``--overwrite``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    listed = read_file_list(folder) or {"files": []}
    _write_file_list(folder, [*listed["files"], *names], partial=True)
    return folder


def _relation(out: Path, src: Path) -> str | None:
    if out == src:
        return "is"
    if out.is_relative_to(src):
        return "is inside"
    if src.is_relative_to(out):
        return "contains"
    return None


def _check_inputs(out: Path, inputs: Iterable[str | os.PathLike | None], flag: str) -> None:
    for raw in inputs:
        if raw is None or str(raw) == "":
            continue
        src = _resolve(raw)
        relation = _relation(out, src)
        if relation:
            raise UserError(f"{flag} {out} {relation} the input {src}: inputs are never modified, so write the "
                            "output somewhere else")


def _check_writable(out: Path, flag: str) -> None:
    """The nearest existing folder at or above ``out`` is a folder we can create files in (a real probe:
    permissions, read-only file systems and full disks all show up here, before any expensive work)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag} {out} cannot be created: {probe} is a file, not a folder; choose another path")
    try:
        Path(tempfile.mkdtemp(prefix=".procrustes-probe-", dir=probe)).rmdir()
    except OSError as exc:
        raise UserError(f"{flag} {out} is not writable ({exc.strerror or type(exc).__name__} in {probe}): "
                        "choose a folder you can write to") from None


def _resumable(out: Path) -> bool:
    """A partial run of the tool: its file list says so, or (written before file lists) it holds compress's
    ``work/config.json`` or the main job's ``.work/``."""
    listed = read_file_list(out)
    if listed is not None:
        return bool(listed.get("partial"))
    return (out / "work" / "config.json").is_file() or (out / ".work").is_dir()


def check_output(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                 overwrite: bool = False, flag: str = "--out", resumable: bool = False) -> Path:
    """Refuse, before any work, an output folder that is, contains or lies inside an input, that is a
    file, that cannot be written, or that is not empty (unless ``overwrite``, or ``resumable`` and it
    holds a partial run of the tool). Returns the resolved path."""
    path = _resolve(out)
    _check_inputs(path, inputs, flag)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder: pass a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite and not (resumable and _resumable(path)):
        raise UserError(f"{flag} {path} is not empty: pass --overwrite to replace what procrustes-onnx wrote "
                        "there (other files are kept), or choose an empty or new folder")
    _check_writable(path, flag)
    return path


def check_output_file(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                      overwrite: bool = False, flag: str = "--output") -> Path:
    """``check_output`` for a single output file (e.g. eval's JSON summary)."""
    path = _resolve(out)
    _check_inputs(path, inputs, flag)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: pass a file path, e.g. {path / 'results.json'}")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path} exists: pass --overwrite to replace it, or choose another file")
    _check_writable(path.parent, flag)
    return path


def _commit(tmp: Path, out: Path, partial: bool) -> None:
    """Put the finished ``tmp`` in place of ``out``. Files in ``out`` the tool did not write never move:
    with none, one rename swaps the folders; with some, the tool's old files are removed and the new
    ones renamed in beside them, the file list always covering every tool file present."""
    written = [f for f in _files(tmp) if f != FILE_LIST]
    if not out.exists():
        _write_file_list(tmp, written, partial)
        os.replace(tmp, out)
        return
    owned = tool_owned(out)
    user = sorted(user_files(out))
    clash = [f for f in user
             if (tmp / f).exists() or any((tmp / p).is_file() for p in Path(f).parents if str(p) != ".")]
    if clash:
        raise UserError(f"{out} holds {clash[0]}, which procrustes-onnx did not write and would replace: move it "
                        "away or choose another output folder")
    if not user:
        _write_file_list(tmp, written, partial)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    _write_file_list(out, [*owned, *written], partial=True)        # a crash from here on loses no user file
    for entry in sorted(owned, key=lambda e: -len(Path(e).parts)):
        target = out / entry
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        for parent in target.parents:                              # folders the tool's files leave empty
            if parent == out or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()
    for rel in written:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, out / rel)
    _write_file_list(out, written, partial)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = True, identity: dict | None = None,
                      partial: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``out_dir``; on success it replaces ``out_dir`` (the tool's files only;
    the user's stay), with ``identity`` written as identity.json; on error it is removed."""
    out = _resolve(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder; pass a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} is not empty: pass --overwrite to replace what procrustes-onnx "
                        "wrote there (other files are kept), or choose another folder")
    _check_writable(out, "output")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if identity is not None:
            write_identity(tmp, identity)
        _commit(tmp, out, partial)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------- identity

def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def identity_id(identity: dict) -> str:
    """A short content hash of an identity (its ``id`` field left out)."""
    body = {k: v for k, v in identity.items() if k != "id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_identity(folder: str | os.PathLike, identity: dict) -> dict:
    """Write identity.json (with its ``id``) into ``folder``; returns the identity written."""
    data = {**identity, "id": identity_id(identity)}
    (Path(folder) / IDENTITY).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def read_identity(folder: str | os.PathLike) -> dict[str, Any] | None:
    """identity.json of a folder, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / IDENTITY).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "kind" in data else None
