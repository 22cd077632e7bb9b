"""One way to write a safetensors file that a crash or a second process never sees half-written."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["save_tensors_atomic"]


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write to a per-process temporary beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
