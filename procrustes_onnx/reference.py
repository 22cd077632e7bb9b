"""The reference a user would pick instead of us: onnxruntime-genai's model builder, run offline on the same
Hugging Face folder (``python -m onnxruntime_genai.models.builder -m DIR -o OUT -p int4 -e cpu``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

__all__ = ["builder_available", "build_reference"]


def builder_available() -> bool:
    """True where onnxruntime-genai is installed (the optional ``genai`` extra)."""
    return importlib.util.find_spec("onnxruntime_genai") is not None


def build_reference(hf_dir: str | Path, out: str | Path, precision: str = "int4") -> Path | None:
    """The builder's ONNX folder for ``hf_dir`` (reused if ``out`` holds one); None, with the builder's last
    line on stderr, if it fails or is not installed: a reference point, never a reason to stop the run."""
    out = Path(out)
    if (out / "genai_config.json").is_file() and (out / "model.onnx").is_file():
        return out
    if not builder_available():
        return None
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / f".{out.name}.cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "model.onnx").is_file():
        last = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        print(f"warning: onnxruntime-genai's builder failed ({last}); the report has no reference point",
              file=sys.stderr)
        return None
    return out
