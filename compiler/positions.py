"""Residual positions 0..2L and the modules that read and write each one: the solver's view of a model.

Position 2l is the stream entering layer l's attention, 2l+1 the stream entering its MLP, and 2L the
final stream read by the head. A rotation Q_p of position p multiplies the readers' input side
(W_in -> Q_p^T W_in) and the writers' output side (W_out -> W_out Q_p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import LinearRef, get_adapter, get_module, surgery_state

__all__ = ["Position", "residual_positions", "num_positions", "stream_matrix", "position_dims"]


@dataclass(frozen=True)
class Position:
    """One residual position: its index, kind ("attn", "mlp", "head"), layer, readers and writers."""

    index: int
    kind: str
    layer: int | None
    readers: tuple[LinearRef, ...]
    writers: tuple[LinearRef, ...]


def num_positions(model: nn.Module) -> int:
    """2L + 1."""
    return 2 * get_adapter(model).num_layers + 1


def _head_ref(model: nn.Module) -> LinearRef:
    """The head's reader: the LM head, or for a fused tied model the small d x d matrix in front of it."""
    adapter = get_adapter(model)
    if surgery_state(model).get("tied_head"):
        return LinearRef("head_pre", f"{adapter.final_norm_path}.proj")
    return LinearRef("head", adapter.lm_head_path, None, adapter.tied)


def residual_positions(model: nn.Module) -> list[Position]:
    """All 2L+1 positions with their readers and writers, in order."""
    adapter = get_adapter(model)
    n_layers = adapter.num_layers
    out: list[Position] = []
    for i in range(n_layers):
        writers = tuple(adapter.embeddings()) if i == 0 else (adapter.mlp_output(i - 1),)
        out.append(Position(2 * i, "attn", i, tuple(adapter.attn_inputs(i)), writers))
        out.append(Position(2 * i + 1, "mlp", i, tuple(adapter.mlp_inputs(i)), (adapter.attn_output(i),)))
    out.append(Position(2 * n_layers, "head", None, (_head_ref(model),), (adapter.mlp_output(n_layers - 1),)))
    return out


def stream_matrix(model: nn.Module, ref: LinearRef) -> torch.Tensor:
    """The weight of `ref` in the in x out convention (a view, not a copy): readers have the stream
    on rows, writers on columns. Embeddings are V x d (one-hot inputs)."""
    module = get_module(model, ref.path)
    if isinstance(module, nn.Embedding):
        return module.weight
    if isinstance(module, nn.Linear):
        return module.weight.t()
    raise TypeError(f"{ref.path} is a {type(module).__name__}, not a dense Linear/Embedding")


def position_dims(model: nn.Module) -> list[int]:
    """Width of the stream at each position (all equal to hidden_size unless sliced)."""
    dims = []
    for pos in residual_positions(model):
        module = get_module(model, pos.writers[0].path)
        dims.append(int(getattr(module, "embedding_dim", None) or module.out_features))  # embeddings: V x d
    return dims
