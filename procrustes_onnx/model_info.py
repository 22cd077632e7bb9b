"""What a model is: architecture, dimensions, and parameters by kind (tied weights counted once)."""

from __future__ import annotations

from collections import Counter

import torch

__all__ = ["model_info"]


def _kind(module: torch.nn.Module, name: str) -> str:
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if "norm" in type(module).__name__.lower() or "norm" in name.split(".")[-1]:
        return "norm"
    if isinstance(module, torch.nn.Linear) or hasattr(module, "in_features"):
        return f"linear:{name.split('.')[-1]}"
    return f"other:{type(module).__name__}"


def model_info(model: torch.nn.Module) -> dict:
    """Dimensions from the config and an honest parameter census (each tensor counted once)."""
    c = model.config
    seen: set[int] = set()
    by_kind: Counter[str] = Counter()
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            by_kind[_kind(module, name)] += p.numel()
    return {
        "architecture": (c.architectures or [type(model).__name__])[0],
        "model_type": c.model_type,
        "hidden_size": c.hidden_size,
        "layers": c.num_hidden_layers,
        "heads": getattr(c, "num_attention_heads", None),     # None: not an attention model (e.g. Mamba)
        "kv_heads": getattr(c, "num_key_value_heads", getattr(c, "num_attention_heads", None)),
        "intermediate_size": getattr(c, "intermediate_size", getattr(c, "ffn_dim", None)),
        "vocab_size": c.vocab_size,
        "max_positions": getattr(c, "max_position_embeddings", None),
        "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "parameters": sum(by_kind.values()),
        "parameters_by_kind": dict(sorted(by_kind.items())),
    }
