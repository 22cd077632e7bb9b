"""Text generation on the ONNX artifact with the KV cache: greedy or sampled, streamed through a callback."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from procrustes_onnx.core.artifacts import artifact_folder
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.runtime.session import OnnxCausalLM, max_positions, tokenizer_for_onnx

__all__ = ["SamplingConfig", "GenerationResult", "TextStream", "pick_token", "generate_ids", "generate",
           "eos_ids_for"]


@dataclass(frozen=True)
class SamplingConfig:
    """`temperature == 0` is greedy; otherwise temperature, then top-k, then top-p (transformers' order)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UserError(f"--top-k {self.top_k} must be >= 0 and --top-p {self.top_p} in (0, 1]")


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only (an EOS that stopped generation included)
    text: str
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    stopped_by: str  # "eos" or "max_new_tokens"

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return asdict(self) | {"decode_tokens_per_s": self.decode_tokens_per_s}


def pick_token(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> int:
    """One token from the logits [V] of the last position."""
    logits = logits.astype(np.float64)
    if config.temperature == 0:
        return int(np.argmax(logits))
    logits = logits / config.temperature
    if 0 < config.top_k < logits.size:
        kth = np.partition(logits, -config.top_k)[-config.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if config.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, config.top_p)) + 1]  # smallest set reaching top_p
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))


def generate_ids(lm: OnnxCausalLM, prompt_ids: Sequence[int], config: SamplingConfig = SamplingConfig(),
                 eos_ids: Sequence[int] = (), on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Prefill the prompt, then decode one token at a time with the cache until EOS or max_new_tokens."""
    config.check()
    if len(prompt_ids) == 0:
        raise UserError("the prompt is empty: pass some text with --prompt")
    rng = np.random.default_rng(config.seed)
    start = time.perf_counter()
    logits, cache = lm.prefill(np.asarray([list(prompt_ids)], np.int64))
    prefill_s = time.perf_counter() - start
    out: list[int] = []
    stopped = "max_new_tokens"
    start = time.perf_counter()
    while True:
        token = pick_token(logits[0], config, rng)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos_ids:
            stopped = "eos"
            break
        if len(out) >= config.max_new_tokens:
            break
        logits, cache = lm.decode_step(np.array([token]), cache)
    return GenerationResult(out, "", len(prompt_ids), prefill_s, time.perf_counter() - start, stopped)


class TextStream:
    """Turns streamed token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, write: Callable[[str], None], skip_ids: Sequence[int] = ()) -> None:
        self.tokenizer, self.write, self.skip = tokenizer, write, set(skip_ids)
        self.ids: list[int] = []
        self.emitted = 0

    def __call__(self, token: int) -> None:
        if token in self.skip:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.emitted:
            self.write(text[self.emitted:])
            self.emitted = len(text)


def eos_ids_for(onnx_path: str | Path, tokenizer=None) -> list[int]:
    """EOS ids from generation_config.json / config.json beside the model, else the tokenizer's."""
    folder = artifact_folder(onnx_path)
    for name in ("generation_config.json", "config.json"):
        f = folder / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                return list(eos) if isinstance(eos, list) else [int(eos)]
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(eos)]


def _stdout(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def generate(onnx_path: str | Path, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, threads: int | None = None, device: str = "cpu",
             stream: Callable[[str], None] | None = _stdout, lm: OnnxCausalLM | None = None,
             tokenizer=None) -> GenerationResult:
    """Prompt -> generated text, streamed piece by piece to `stream` (stdout by default; None for silence)."""
    lm = lm or OnnxCausalLM(onnx_path, device, threads)
    tokenizer = tokenizer or tokenizer_for_onnx(lm.path)
    config = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed)
    eos = eos_ids_for(lm.path, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    limit = max_positions(lm.path)
    if limit and len(prompt_ids) + config.max_new_tokens > limit:
        raise UserError(f"the prompt ({len(prompt_ids)} tokens) plus --max-new-tokens {config.max_new_tokens} "
                        f"exceeds the model's context of {limit} positions: shorten the prompt or lower "
                        f"--max-new-tokens to {max(limit - len(prompt_ids), 0)}")
    streamer = TextStream(tokenizer, stream, eos) if stream is not None else None
    result = generate_ids(lm, prompt_ids, config, eos, streamer)
    result.text = tokenizer.decode([t for t in result.token_ids if t not in eos], skip_special_tokens=True)
    if streamer is not None and result.text[streamer.emitted:]:
        stream(result.text[streamer.emitted:])
    return result
