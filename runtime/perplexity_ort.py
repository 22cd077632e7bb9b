"""Perplexity on the ONNX artifact: a `logits_fn` for `runtime.perplexity.evaluate_perplexity`."""

from __future__ import annotations

from pathlib import Path

import torch

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.runtime.perplexity import LogitsFn
from procrustes_onnx.runtime.session import OnnxCausalLM, max_positions, tokenizer_for_onnx

__all__ = ["ort_logits_fn", "tokenizer_for_onnx", "max_positions"]


def ort_logits_fn(path: str | Path | OnnxCausalLM, threads: int | None = None, device: str = "cpu",
                  opt_level: str = "all") -> LogitsFn:
    """Logits of the ONNX model for a LongTensor [B, T], as a float32 torch tensor (empty KV cache)."""
    lm = path if isinstance(path, OnnxCausalLM) else OnnxCausalLM(path, device, threads, opt_level)
    max_len = max_positions(lm.path)

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        if max_len is not None and input_ids.shape[1] > max_len:
            raise UserError(f"window of {input_ids.shape[1]} tokens exceeds the model's {max_len} positions: "
                            f"pass --window {max_len} or less")
        return torch.from_numpy(lm.logits(input_ids.numpy())).float()

    return fn
