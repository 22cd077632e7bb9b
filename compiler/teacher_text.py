"""Healing text sampled from the dense teacher itself (``--heal-text teacher``).

Distilling on a fixed corpus pulls the small student towards that corpus (docs/healing.md: its held-out KL
on `mix` kept falling while Jargon PPL stalled). The teacher's own samples are the one text whose distribution
is the teacher's, in every domain it knows, and they need no data set (the idea of LLM-QAT's data-free
distillation, Liu et al. 2023). Each sequence starts from a uniformly drawn token id and is sampled at
temperature 1 with the KV cache; sequences are cached on disk keyed by the teacher's weights and the settings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import StaticCache

from .adapters import cache_keyword
from .tensor_files import save_tensors_atomic

__all__ = ["sample_teacher_windows", "TEACHER_TEXT"]

TEACHER_TEXT = "teacher"


@torch.no_grad()
def _sample(teacher: nn.Module, n: int, seq_len: int, seed: int, batch: int, progress: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    vocab = int(teacher.config.vocab_size)
    device = next(teacher.parameters()).device
    cache_arg = cache_keyword(teacher)  # the cache object is ours
    out = []
    bar = tqdm(total=n * seq_len, desc="teacher text", unit="tok", unit_scale=True, disable=not progress)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        ids = torch.randint(0, vocab, (b, 1), generator=gen)
        # a preallocated cache: a growing one is copied whole at every step, quadratic in seq_len
        past = StaticCache(config=teacher.config, max_cache_len=seq_len)
        seq = [ids]
        for t in range(seq_len - 1):
            step = teacher(input_ids=ids.to(device), use_cache=True, cache_position=torch.tensor([t], device=device),
                           **{cache_arg: past})
            probs = torch.softmax(step.logits[:, -1].float().cpu(), dim=-1)
            ids = torch.multinomial(probs, 1, generator=gen)
            seq.append(ids)
            bar.update(b)
        bar.update(b)
        out.append(torch.cat(seq, dim=1))
    bar.close()
    return torch.cat(out)


def sample_teacher_windows(teacher: nn.Module, teacher_id: str, n_train: int, n_held: int, seq_len: int, seed: int,
                           *, cache: Path | None = None, batch: int = 32,
                           progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [n_train, seq_len], held-out [n_held, seq_len]) sampled from ``teacher``; the held-out ones use
    another seed, so the two never share a sequence. Deterministic for (teacher, seed, batch): the batch
    decides the order of the random draws."""
    key = hashlib.sha256(f"{teacher_id}|{n_train}|{n_held}|{seq_len}|{seed}|{batch}".encode()).hexdigest()[:16]
    path = None if cache is None else cache / f"teacher-text-{key}.safetensors"
    if path is not None and path.is_file():
        saved = load_file(str(path))
        return saved["train"], saved["held"]
    was_training = teacher.training
    teacher.eval()
    held = _sample(teacher, n_held, seq_len, seed * 2 + 1, batch, progress) if n_held else torch.zeros(0, seq_len, dtype=torch.long)
    train = _sample(teacher, n_train, seq_len, seed * 2, batch, progress)
    teacher.train(was_training)
    if path is not None:
        save_tensors_atomic({"train": train.contiguous(), "held": held.contiguous()}, path)
    return train, held
