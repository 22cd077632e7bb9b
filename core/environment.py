"""The machine and versions a measurement was taken with, recorded beside every reported number."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from importlib import metadata
from pathlib import Path

__all__ = ["environment", "write_results", "cpu_model", "package_versions"]

_PACKAGES = ("torch", "onnxruntime", "onnx", "onnx-ir", "onnxscript", "transformers", "lm_eval", "numpy")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_versions(names: tuple[str, ...] = _PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None where missing), keyed by the name as given."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict:
    """Date (UTC), machine and package versions, for the JSON next to every benchmark table."""
    versions = package_versions()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1) if mem else None,
                    "platform": platform.platform(), "python": platform.python_version()},
        "versions": versions,
    }


def write_results(path: str | Path, payload: dict) -> Path:
    """Write JSON atomically, with the environment merged in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**environment(), **payload}, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
