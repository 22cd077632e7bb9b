"""Reuse an exported graph for a model of the same architecture by swapping its weights.

A globally rotated (or any same-shaped) model differs from the dense one only in its parameter values,
so its ONNX graph is the dense graph with other initializers. Tracing a 30-layer decoder takes over a
minute on 2 cores; swapping takes seconds. The swap is refused (None) unless every parameter of the
model lands on exactly one initializer of the right shape, and the caller checks the result numerically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from .onnx_export import MAP_FILE

__all__ = ["swap_weights"]

logger = logging.getLogger(__name__)


def _same_config(model: torch.nn.Module, folder: Path) -> bool:
    """The template was exported from a model of this exact shape (layers, widths, heads, vocab)."""
    path = folder / "config.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings", "head_dim")
    mine = model.config.to_dict()
    return all(saved.get(k) == mine.get(k) for k in keys)


def swap_weights(model: torch.nn.Module, template_dir: str | Path) -> tuple[ir.Model, dict] | None:
    """The template's graph carrying ``model``'s parameters, and its matmul map; None if they do not fit."""
    folder = Path(template_dir)
    if not (folder / "model.onnx").is_file() or not (folder / MAP_FILE).is_file() or not _same_config(model, folder):
        return None
    graph_model = ir.load(folder / "model.onnx")
    inits = graph_model.graph.initializers
    mapping = json.loads((folder / MAP_FILE).read_text())
    modules = dict(model.named_modules())
    new: dict[str, np.ndarray] = {}
    placed: list[torch.Tensor] = []  # parameters already given an initializer (a tied one counts once)
    for name, entry in mapping.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight") or getattr(module, "bias", None) is not None:
            return None
        w = module.weight.detach().to(torch.float32).numpy()
        new[entry["weight"]] = w.T if entry["transposed"] else w
        placed.append(module.weight)
    for key, tensor in model.state_dict(keep_vars=True).items():
        if any(tensor is p for p in placed):
            continue
        if key not in inits:
            if isinstance(tensor, torch.nn.Parameter) and not any(
                    p.shape == tensor.shape and torch.equal(p, tensor) for p in placed):
                return None  # neither in the graph nor a (loaded untied) copy of a placed one: trace instead
            continue  # a buffer (e.g. rotary inv_freq) the exporter turned into constants of its own
        new[key] = tensor.detach().to(torch.float32).numpy()
        placed.append(tensor)
    for name, value in new.items():
        old = inits.get(name)
        if old is None or old.const_value is None or tuple(old.shape) != value.shape:
            return None
        old.const_value = ir.tensor(np.ascontiguousarray(value), name=name)
    logger.info("reused %s with %d swapped initializers", folder / "model.onnx", len(new))
    return graph_model, mapping
