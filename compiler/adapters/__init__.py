"""Architecture adapters: `get_adapter(model)` picks the one for a model's `config.model_type`."""

from __future__ import annotations

from torch import nn

from procrustes_onnx.core.errors import UserError

from .base import LinearRef, ModelAdapter, cache_keyword, get_module, set_module, surgery_state
from .llama import LlamaAdapter
from .opt import OPTAdapter

__all__ = ["ADAPTERS", "LinearRef", "ModelAdapter", "get_adapter", "get_module", "set_module",
           "supported_model_types", "surgery_state"]

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, OPTAdapter)


def supported_model_types() -> list[str]:
    """Every `config.model_type` some adapter accepts."""
    return [t for a in ADAPTERS for t in a.model_types]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`, or a UserError listing the supported model types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise UserError(f"unsupported model type {model_type!r}; supported: {', '.join(supported_model_types())}")
