"""The adapter contract: which modules read and write the residual stream, named by role.

Adapters are the only code that knows Hugging Face attribute names. Everything else in
`procrustes_onnx.compiler` speaks in roles ("q", "down", "embed", ...) and module paths.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

from torch import nn

__all__ = ["LinearRef", "ModelAdapter", "cache_keyword", "get_module", "set_module", "surgery_state"]


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``cache`` from transformers 5.25 (where
    ``past_key_values`` is deprecated, and removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

READER_ROLES = ("q", "k", "v", "gate", "up", "head", "head_pre")
WRITER_ROLES = ("o", "down", "embed", "pos_embed")


@dataclass(frozen=True)
class LinearRef:
    """One module touching the residual stream: its role, dotted module path and layer (None outside layers).

    `tied` marks an embedding whose table is also the LM head's weight (compress one, change both).
    """

    role: str
    path: str
    layer: int | None = None
    tied: bool = False

    @property
    def reads(self) -> bool:
        """True if the module reads the stream (rotated on its input side)."""
        return self.role in READER_ROLES


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path (thin wrapper so callers never touch attribute names)."""
    return model.get_submodule(path)


def set_module(model: nn.Module, path: str, module: nn.Module | None) -> None:
    """Replace the submodule at a dotted path."""
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def surgery_state(model: nn.Module) -> dict:
    """The JSON-able record of what surgery was done (lives in `config.procrustes`, so it is saved)."""
    state = getattr(model.config, "procrustes", None)
    if state is None:
        state = {"fused": False, "shortcuts": False, "rotation": "none", "tied_head": False, "centring": False}
        model.config.procrustes = state
    return state


class ModelAdapter(ABC):
    """Maps one HF architecture family onto roles; one small subclass per family.

    Residual positions: 2l is the stream entering layer l's attention, 2l+1 the stream entering
    its MLP, 2L the final stream read by the head.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: LayerNorm families keep the stream zero-mean after fusion (SliceGPT's mean-centring).
    centres_stream: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.validate()

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        """Width of the residual stream before any slicing."""
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers L (positions run 0..2L)."""
        return len(self.layers())

    @property
    def tied(self) -> bool:
        """True when the LM head shares its weight with the token embedding."""
        head, embed = get_module(self.model, self.lm_head_path), get_module(self.model, self.embed_path)
        if getattr(head, "embedding", None) is embed:          # FactoredHead on a FactoredEmbedding
            return True
        return getattr(head, "weight", None) is not None and head.weight is getattr(embed, "weight", None)

    def validate(self) -> None:
        """Raise UserError for variants of the family the surgery does not support."""

    # -- paths (the HF names) ------------------------------------------------------------------
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def layer_path(self, i: int) -> str:
        """Dotted path of decoder layer i."""

    embed_path: ClassVar[str]
    lm_head_path: ClassVar[str]
    final_norm_path: ClassVar[str]
    #: where a module applied to the token embedding output can be installed (None if nowhere)
    embed_hook_path: ClassVar[str | None] = None
    #: learned position embedding writing position 0 (OPT), else None
    pos_embed_path: ClassVar[str | None] = None
    #: attribute names inside a decoder layer, role -> attribute path
    layer_linears: ClassVar[dict[str, str]]
    attn_norm_name: ClassVar[str]
    mlp_norm_name: ClassVar[str]

    @abstractmethod
    def norm_params(self, norm: nn.Module) -> tuple:
        """(gain, bias or None, eps) of one of this family's norm modules."""

    @abstractmethod
    def shortcut_forward(self) -> Callable:
        """The decoder-layer forward that applies `self.attn_shortcut` and `self.mlp_shortcut`
        to the residual path (installed by `compiler.skips` through a subclass of the layer class)."""

    # -- derived views ---------------------------------------------------------------------------
    def linear(self, i: int, role: str) -> LinearRef:
        """The LinearRef of role `role` in layer i."""
        return LinearRef(role, f"{self.layer_path(i)}.{self.layer_linears[role]}", i)

    def attn_inputs(self, i: int) -> list[LinearRef]:
        """Linears reading the stream before attention (q, k, v)."""
        return [self.linear(i, r) for r in ("q", "k", "v")]

    def mlp_inputs(self, i: int) -> list[LinearRef]:
        """Linears reading the stream before the MLP (gate and up, or up alone)."""
        return [self.linear(i, r) for r in ("gate", "up") if r in self.layer_linears]

    def attn_output(self, i: int) -> LinearRef:
        """The attention output projection (writes the pre-MLP position)."""
        return self.linear(i, "o")

    def mlp_output(self, i: int) -> LinearRef:
        """The MLP output projection (writes the next layer's pre-attention position)."""
        return self.linear(i, "down")

    def attn_norm_path(self, i: int) -> str:
        """Path of the norm before attention in layer i."""
        return f"{self.layer_path(i)}.{self.attn_norm_name}"

    def mlp_norm_path(self, i: int) -> str:
        """Path of the norm before the MLP in layer i."""
        return f"{self.layer_path(i)}.{self.mlp_norm_name}"

    def embeddings(self) -> list[LinearRef]:
        """Modules writing position 0: the token embedding (and learned positions)."""
        refs = [LinearRef("embed", self.embed_path, None, self.tied)]
        if self.pos_embed_path is not None:
            refs.append(LinearRef("pos_embed", self.pos_embed_path))
        return refs
