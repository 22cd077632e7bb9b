"""Work files that a crash or a second process never sees half-written: safetensors, and torch.save for tensors
that must come back with the allocator's alignment."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["save_tensors_atomic", "save_torch_atomic", "load_aligned"]


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write to a per-process temporary beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def save_torch_atomic(obj, path: Path) -> None:
    """torch.save to a per-process temporary beside ``path``, then rename it into place."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_aligned(path: Path):
    """What `save_torch_atomic` wrote. torch.load gives the allocator's 64-byte alignment, as in-memory tensors
    have; safetensors' load_file gives 16, and BLAS rounds some products differently on it (a solve fed from
    disk would then differ from one fed from memory in the last bits)."""
    return torch.load(path, weights_only=True)
