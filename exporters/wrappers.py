"""Flat-tensor wrappers around a HF causal LM, so torch.onnx sees plain inputs/outputs with optimum's names.

The dynamo exporter cannot take a ``Cache`` object as an input, so the KV wrapper rebuilds a
``DynamicCache`` from one key and one value tensor per layer and returns the updated ones flat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from procrustes_onnx.compiler.adapters import cache_keyword

__all__ = ["KVCacheWrapper", "LogitsWrapper", "IOSpec", "io_spec", "example_inputs"]


class KVCacheWrapper(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present), past/present as k0, v0, k1, ..."""

    def __init__(self, model: torch.nn.Module, rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """``rotary`` (cos, sin caches) marks a model whose attention is fused (exporters.gqa): each layer
        then gets (seqlens_k, total_length, cos, sin, position_ids, query_seqlens) once, as ``gqa_inputs``."""
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.fused = rotary is not None
        if self.fused:
            self.register_buffer("cos_cache", rotary[0], persistent=False)
            self.register_buffer("sin_cache", rotary[1], persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        extra = {}
        if self.fused:
            from .gqa import gqa_lengths, query_lengths

            extra["gqa_inputs"] = (*gqa_lengths(attention_mask), self.cos_cache, self.sin_cache, position_ids,
                                   query_lengths(input_ids))
        extra[cache_keyword(self.model)] = cache
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **extra)
        flat = [out.logits]
        for layer in cache.layers[: self.num_layers]:  # updated in place by every attention layer
            flat += [layer.keys, layer.values]
        return tuple(flat)


class LogitsWrapper(torch.nn.Module):
    """(input_ids, attention_mask, position_ids) -> logits, no cache: the graph perplexity runs use."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits


@dataclass(frozen=True)
class IOSpec:
    """Names and dynamic axes of one exported graph (optimum's conventions)."""

    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple
    num_layers: int
    num_kv_heads: int
    head_dim: int


def _kv_geometry(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def io_spec(config, with_past: bool) -> IOSpec:
    """Input/output names and ``torch.export.Dim`` dynamic shapes; the mask gets its own ``total`` dim
    because Dim arithmetic (seq + past) is refused by torch.export."""
    layers = config.num_hidden_layers
    kv_heads, head_dim = _kv_geometry(config)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence_length")
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    if not with_past:
        shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq})
        return IOSpec(inputs, outputs, shapes, layers, kv_heads, head_dim)
    past, total = torch.export.Dim("past_sequence_length"), torch.export.Dim("total_sequence_length")
    kv_names = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    inputs += [f"past_key_values.{n}" for n in kv_names]
    outputs += [f"present.{n}" for n in kv_names]
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
              tuple({0: batch, 2: past} for _ in kv_names))
    return IOSpec(inputs, outputs, shapes, layers, kv_heads, head_dim)


def example_inputs(config, spec: IOSpec, *, batch: int = 2, seq: int = 3, past: int = 5,
                   dtype: torch.dtype = torch.float32) -> tuple:
    """Tracing inputs whose sizes are all distinct and > 1, so no dim is specialised to a constant."""
    gen = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    if len(spec.input_names) == 3:
        ids = torch.randint(0, vocab, (batch, seq + past), generator=gen)
        pos = torch.arange(seq + past).expand(batch, -1).contiguous()
        return ids, torch.ones_like(ids), pos
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, -1).contiguous()
    kv = tuple(torch.randn(batch, spec.num_kv_heads, past, spec.head_dim, generator=gen, dtype=dtype)
               for _ in range(2 * spec.num_layers))
    return (ids, mask, pos, *kv)
