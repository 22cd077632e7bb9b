"""Calibration statistics for the weighted stage: input Gram matrices of chosen linears and token
frequencies (method.md §3.4, §3.1).

Grams are taken from the dense, norm-fused model once: the inputs of stream readers (q/k/v,
gate/up, head) are the normed stream, and RMSNorm commutes with rotations, so in a basis rotated
by R their Gram is R^T C R (`rotate_gram`); o/down inputs do not depend on any rotation. Since the
paper measures activations on the dense rotated model (no error propagation), one pass suffices.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.texts import load_text, tokenize_corpus

from .adapters import get_adapter

__all__ = ["GramSum", "calibration_windows", "calibration_windows_for", "calibration_split", "collect_grams", "collect_curvature", "capture_layer_inputs", "StopForward", "token_counts", "rotate_gram", "damp_gram"]

log = logging.getLogger(__name__)


def calibration_windows(tokens: torch.Tensor, n_samples: int = 32, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random offsets (paper: 128 x 2048)."""
    tokens = tokens.flatten().long()
    if tokens.numel() < seq_len + 1:
        raise UserError(f"calibration text has {tokens.numel()} tokens, fewer than one {seq_len}-token window: "
                        "pass a longer --calib text or a smaller --calib-seq-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([tokens[s: s + seq_len] for s in starts.tolist()])


def calibration_windows_for(tokenizer, config, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The seeded calibration windows of a CompressionConfig: from ``tokens`` if given, else from its
    ``calib_text`` ('kjv', a file, or 'name@N' to skip the text's first N tokens)."""
    if tokens is not None:
        return calibration_windows(tokens, config.calib_samples, config.calib_seq_len, config.seed)
    if tokenizer is None:
        raise UserError(f"--method {config.method} needs the model's tokenizer for calibration text: pass it"
                        + (", or use --method frobenius" if config.method == "weighted" else ""))
    stream, span = _calibration_stream(tokenizer, config, 0)
    return calibration_windows(stream[:span], config.calib_samples, config.calib_seq_len, config.seed)


def _calibration_stream(tokenizer, config, extra: int) -> tuple[torch.Tensor, int]:
    """(tokens of ``calib_text`` after its offset, the length of the range calibration draws from): the
    range is 4x the calibration tokens, and ``extra`` tokens after it are read too (the held-out slice)."""
    need = config.calib_samples * config.calib_seq_len
    name, skip = _split_offset(config.calib_text)
    span = max(4 * need, need + 1)
    return tokenize_corpus(tokenizer, load_text(name), max_tokens=skip + span + extra)[skip:], span


def calibration_split(tokenizer, config, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, held-out windows): the same seeded calibration windows as
    `calibration_windows_for`, and ``config.heldout_samples`` non-overlapping windows of the text that
    follows the range they are drawn from, so the two never share a token (given ``tokens``: its last
    windows are held out and the calibration draws from the rest)."""
    held = config.heldout_samples * config.calib_seq_len
    if tokens is not None:
        tokens = tokens.flatten().long()
        if tokens.numel() < held + config.calib_seq_len + 1:
            raise UserError(f"calibration tokens ({tokens.numel()}) cannot hold {config.heldout_samples} held-out "
                            f"windows of {config.calib_seq_len} and one calibration window: pass more tokens")
        calib = calibration_windows(tokens[:-held], config.calib_samples, config.calib_seq_len, config.seed)
        return calib, tokens[-held:].reshape(config.heldout_samples, config.calib_seq_len)
    if tokenizer is None:
        raise UserError("the held-out loss needs the model's tokenizer for the calibration text: pass it")
    stream, span = _calibration_stream(tokenizer, config, held)
    if stream.numel() < span + held:
        raise UserError(f"calibration text {config.calib_text!r} has {stream.numel():,} tokens after its offset, fewer "
                        f"than the {span + held:,} that calibration and the held-out slice need: lower "
                        "--calib-samples or --heldout-samples, or pass a longer text")
    calib = calibration_windows(stream[:span], config.calib_samples, config.calib_seq_len, config.seed)
    return calib, stream[span: span + held].reshape(config.heldout_samples, config.calib_seq_len).clone()


def _split_offset(calib_text: str) -> tuple[str, int]:
    """'jargon@102400' -> ('jargon', 102400): calibrate on the text after its first N tokens, e.g. held out
    from an evaluation that reads those first N tokens."""
    name, sep, offset = calib_text.rpartition("@")
    if not sep or not offset.isdigit():
        return calib_text, 0
    return name, int(offset)


def token_counts(windows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in the calibration windows (the embedding's diagonal Gram)."""
    return torch.bincount(windows.flatten(), minlength=vocab_size)[:vocab_size].to(torch.float64)


class GramSum:
    """Running sums X^T X (float64) and token counts per module path, fed by forward pre-hooks or directly:
    the in-memory and the streamed (`compiler.stream`) passes share it, so their Grams add the same batches
    in the same order and come out bitwise equal."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.device = torch.device(device)  # where the sums run (N x d^2 float64 flops: a GPU's job when lent)

    def add(self, path: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.device, torch.float64)
        if path not in self.sums:
            self.sums[path] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=self.device)
            self.counts[path] = 0
        self.sums[path].addmm_(x.T, x)
        self.counts[path] += x.shape[0]

    def hook(self, path: str):
        """A forward pre-hook adding its module's input under ``path``."""
        def hook(_module, args):
            self.add(path, args[0])
        return hook

    def grams(self, paths: list[str]) -> dict[str, torch.Tensor]:
        """C = X^T X / N per path, divided in place and handed over (the sums of ``paths`` are dropped, so
        no Gram is held twice). A path no hook ever saw is a bug in the caller, not bad input."""
        missing = [p for p in paths if p not in self.sums]
        if missing:
            raise RuntimeError(f"calibration hooks never fired for {missing[:3]}")
        return {p: self.sums.pop(p).div_(self.counts.pop(p)).cpu() for p in paths}


@torch.inference_mode()
def collect_grams(model: nn.Module, windows: torch.Tensor, paths: Iterable[str], *, batch_size: int = 4,
                  progress: bool = True, device: str = "cpu") -> dict[str, torch.Tensor]:
    """C = X^T X / N (float64, on the CPU) of the input X of each module in ``paths`` over all calibration tokens.

    Hooks run during plain forward passes of the model in batches, so memory is the model plus
    one batch of activations plus the Grams. The sums run on ``device`` (the forward stays where the model is).
    """
    paths = list(dict.fromkeys(paths))
    acc = GramSum(device)
    handles = [model.get_submodule(p).register_forward_pre_hook(acc.hook(p)) for p in paths]
    try:
        bar = tqdm(total=windows.shape[0], desc="calibration", unit="seq", disable=not progress, leave=False)
        for i in range(0, windows.shape[0], batch_size):
            batch = windows[i: i + batch_size]
            model(input_ids=batch, use_cache=False)
            bar.update(batch.shape[0])
        bar.close()
    finally:
        for h in handles:
            h.remove()
    return acc.grams(paths)


def collect_curvature(model: nn.Module, windows: torch.Tensor, paths: Iterable[str], *, batch_size: int = 2,
                      progress: bool = True, input_grams: bool = True,
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(C, G) per module in ``paths``, float64: C = X^T X / N of its input and G = sum_t g_t g_t^T / N of
    the gradient g_t of the summed next-token loss at its output, over all N calibration tokens.

    Together they are the Kronecker-factored (K-FAC) curvature of the loss in that module's weight, so
    0.5 tr(dW^T C dW G) estimates the loss a weight error dW adds. Gradients flow only to activations:
    every parameter is frozen for the pass and restored after it. G only ranks options, so each batch's
    g^T g is a float32 product (added to a float64 sum): the float64 products were most of the pass.
    ``input_grams`` False skips C (returned empty) for a caller that has it already."""
    paths = list(dict.fromkeys(paths))
    grams: dict[str, torch.Tensor] = {}
    fishers: dict[str, torch.Tensor] = {}
    handles = []

    def accumulate(store: dict, path: str, t: torch.Tensor, dtype: torch.dtype) -> None:
        t = t.detach().reshape(-1, t.shape[-1]).to(dtype)
        if path not in store:
            store[path] = torch.zeros(t.shape[1], t.shape[1], dtype=torch.float64)
        store[path] += (t.T @ t).to(torch.float64)

    def make_hook(path: str):
        def hook(_module, args, out):
            if input_grams:
                accumulate(grams, path, args[0], torch.float64)
            if out.requires_grad:
                out.register_hook(lambda g: accumulate(fishers, path, g, torch.float32))
        return hook

    embed = model.get_submodule(get_adapter(model).embed_path)
    handles.append(embed.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True)))
    for p in paths:
        handles.append(model.get_submodule(p).register_forward_hook(make_hook(p)))
    flags = [(prm, prm.requires_grad) for prm in model.parameters()]
    for prm, _ in flags:
        prm.requires_grad_(False)
    n_tokens = 0
    try:
        with torch.enable_grad():
            bar = tqdm(total=windows.shape[0], desc="curvature", unit="seq", disable=not progress, leave=False)
            for i in range(0, windows.shape[0], batch_size):
                batch = windows[i: i + batch_size]
                logits = model(input_ids=batch, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                         batch[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
                n_tokens += batch.numel()
                bar.update(batch.shape[0])
            bar.close()
    finally:
        for h in handles:
            h.remove()
        for prm, flag in flags:
            prm.requires_grad_(flag)
    missing = [p for p in paths if p not in fishers]
    if missing:
        raise RuntimeError(f"curvature hooks never saw a gradient for {missing[:3]}")
    return {p: grams[p] / n_tokens for p in grams}, {p: fishers[p] / n_tokens for p in paths}


def damp_gram(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """C + damp * mean(diag C) I: keeps directions the calibration text never excites anchored to the
    original weights (an undamped weighted fit may put anything there) and the solves well posed."""
    if damp <= 0:
        return gram
    return gram + damp * torch.diagonal(gram).mean() * torch.eye(gram.shape[0], dtype=gram.dtype)


def rotate_gram(gram: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Gram of x R given the Gram of x: R^T C R (symmetrised against round-off)."""
    g = r.T.to(gram.dtype) @ gram @ r.to(gram.dtype)
    return 0.5 * (g + g.T)


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the tensors it needs are known."""


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states entering decoder layer 0, the layer's keyword arguments) per calibration batch, so
    later passes can run the model one layer at a time."""
    layer0 = get_adapter(model).layers()[0]
    cached: list[tuple[torch.Tensor, dict]] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        cached.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[i: i + batch_size], use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return cached
