"""The inputs of an exported causal-LM graph (optimum style: ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key|value``) and the one builder of its ONNX Runtime feeds.

The exporter's own checks (``exporters.pipeline.ort_logits``) and the ORT runtime
(``runtime.session.OnnxCausalLM``) both feed graphs through here, so masks, positions and empty caches
agree; it lives in core because the runtime imports no torch and exporters/ does."""

from __future__ import annotations

import re
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np

from .errors import UserError

__all__ = ["ATTENTION_KEY", "PAST_INPUT", "past_names", "past_layout", "empty_past", "token_ids", "decoder_feeds"]

ATTENTION_KEY = "procrustes_onnx.attention"  # model metadata: "gqa" for fused GroupQueryAttention graphs
PAST_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ONNX_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(bfloat16)": np.float32}


def past_names(names: Iterable[str]) -> list[str]:
    """The graph's past inputs in layer order (key before value in each layer)."""
    return sorted((n for n in names if PAST_INPUT.match(n)), key=lambda n: (int(PAST_INPUT.match(n).group(1)), n))


def past_layout(inputs: Sequence[Any], where: str,
                head_size: int | None = None) -> tuple[dict[str, tuple[int, int]], type]:
    """({past input: (kv_heads, head_dim)} in layer order, numpy dtype) from a session's ``get_inputs()``.

    ``head_size`` fills a symbolic head dimension (e.g. onnxruntime-genai's 'kv_cache_dim')."""
    by_name = {i.name: i for i in inputs}
    shapes: dict[str, tuple[int, int]] = {}
    dtype = np.float32
    for name in past_names(by_name):
        shape = list(by_name[name].shape)
        if len(shape) == 4 and isinstance(shape[1], int) and not isinstance(shape[3], int):
            shape[3] = head_size
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise UserError(f"{where}: {name} has shape {shape}; expected [batch, kv_heads, past, head_dim]")
        shapes[name] = (shape[1], shape[3])
        dtype = _ONNX_TO_NP.get(by_name[name].type, np.float32)
    return shapes, dtype


def empty_past(layout: Mapping[str, tuple[int, int]], dtype: type, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors [batch, kv_heads, 0, head_dim]: the cache before the first token."""
    return {n: np.zeros((batch, h, 0, d), dtype) for n, (h, d) in layout.items()}


def token_ids(input_ids: Any) -> np.ndarray:
    """``input_ids`` as the contiguous int64 [batch, seq] array the graph takes."""
    ids = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
    if ids.ndim != 2:
        raise UserError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    return ids


def decoder_feeds(input_names: Collection[str], input_ids: Any, past: Mapping[str, Any] | None = None,
                  past_mask: np.ndarray | None = None,
                  attention_mask: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """(feeds for the graph's inputs, the full attention mask) for ``input_ids`` after ``past``.

    ``past_mask`` [B, past] is the mask the past was run with; ``attention_mask`` [B, T] marks padding in
    the new tokens (left padding only). Positions count only unmasked tokens, as transformers does."""
    ids = token_ids(input_ids)
    batch, seq = ids.shape
    past_mask = np.zeros((batch, 0), np.int64) if past_mask is None else past_mask
    new_mask = np.ones((batch, seq), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    mask = np.concatenate([past_mask, new_mask], axis=1)
    positions = (np.cumsum(mask, axis=1) - 1).clip(min=0)[:, past_mask.shape[1]:]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.ascontiguousarray(positions),
             **(past or {})}
    return {k: v for k, v in feeds.items() if k in input_names}, mask
