"""The one perplexity code path: torch and ONNX Runtime differ only in the `logits_fn` they pass."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from procrustes_onnx.core.errors import UserError

__all__ = ["PerplexityResult", "make_windows", "evaluate_perplexity", "torch_logits_fn", "prefix_ppl",
           "PROTOCOL_WINDOW", "PROTOCOL_TOKENS"]

PROTOCOL_WINDOW = 1024
PROTOCOL_TOKENS = 102_400
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens_scored: int
    windows: int
    seconds: float
    tokens_per_s: float
    window_nll: list[float] = field(default_factory=list)  # mean NLL of each window, so a prefix can be re-scored

    def to_dict(self) -> dict:
        return asdict(self)


def make_windows(tokens: torch.Tensor, window: int = PROTOCOL_WINDOW, max_tokens: int | None = PROTOCOL_TOKENS,
                 max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of the first `max_tokens` tokens; a trailing partial window is dropped."""
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n = tokens.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"the text has {tokens.numel()} tokens, fewer than one {window}-token window: use a "
                        "longer text or a smaller --window")
    return tokens[: n * window].view(n, window)


def evaluate_perplexity(logits_fn: LogitsFn, windows: torch.Tensor, *, batch_size: int = 1,
                        progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """Score every window; position 0 of each window is context only, never scored."""
    total_nll, scored, per_window = 0.0, 0, []
    start = time.perf_counter()
    bar = tqdm(total=windows.shape[0], desc=desc, unit="win", disable=not progress, leave=False)
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i: i + batch_size]
        logits = logits_fn(batch)[:, :-1].float()
        targets = batch[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                reduction="none").double().view(targets.shape)
        per_window.extend(float(v) for v in nll.mean(1))
        total_nll += float(nll.sum())
        scored += targets.numel()
        bar.update(batch.shape[0])
    bar.close()
    seconds = time.perf_counter() - start
    mean = total_nll / scored
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens_scored=scored, windows=int(windows.shape[0]),
                            seconds=seconds, tokens_per_s=windows.numel() / seconds, window_nll=per_window)


def prefix_ppl(result: dict, windows: int) -> float | None:
    """Perplexity of the first ``windows`` windows of a result dict (equal-length windows), None if it
    holds fewer or predates per-window scores."""
    scores = result.get("window_nll") or []
    return math.exp(sum(scores[:windows]) / windows) if len(scores) >= windows else None


def torch_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Logits of a torch causal LM, without the KV cache and without gradients."""
    max_len = getattr(model.config, "max_position_embeddings", None)

    @torch.inference_mode()
    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        if max_len is not None and input_ids.shape[1] > max_len:
            raise UserError(f"window of {input_ids.shape[1]} tokens exceeds the model's {max_len} positions: "
                            f"pass --window {max_len} or less")
        return model(input_ids=input_ids, use_cache=False).logits

    return fn
