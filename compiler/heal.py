"""Healing: train a compressed model against its dense teacher, keeping its structure (factors stay
factors, orthogonal Cayley skips stay fixed), so export, rewrite and file size do not move.

Two modes:
- ``blockwise``: decoder layer by layer, each compressed layer trained (Adam, normalised MSE) to map its
  inputs, which come from the already-healed compressed prefix, to the dense layer's output expressed in
  the compressed model's basis of the residual stream. Memory: one layer's activations at a time.
- ``e2e``: KL divergence to the teacher's next-token distribution, the teacher's top-k probabilities
  (plus the tail mass as one bucket) computed once and cached on disk, so the teacher never runs twice.

The basis map: the compressed stream at residual position p is the dense stream times Q_p (orthonormal
columns). Q_0 is recovered exactly from the two embedding tables (E_c = E_d Q_0, a Procrustes problem with
a zero-residual solution); a model without skips has Q_p = Q_0 everywhere; square orthogonal skips give
Q_p = Q_{p-1} S_p; sliced (rectangular) skips lose that chain, and Q_p is then fitted by Procrustes between
the dense and compressed hidden states of the training tokens.

Both modes score a held-out slice of the training text, keep the best state and stop early when it stops
improving, and checkpoint their progress into ``work`` (a killed run resumes to the same weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.outputs import check_output, read_identity, register
from procrustes_onnx.core.sources import model_fingerprint
from procrustes_onnx.core.texts import load_text, tokenize_corpus
from procrustes_onnx.ops import StructuredLinear
from procrustes_onnx.ops.embedding import FactoredEmbedding, FactoredHead

from .adapters import get_adapter, get_module
from .calibration import _split_offset, capture_layer_inputs
from .config import check_device, result_settings
from .fake_quant import WeightQuant, quant_targets, quantized_weights
from .teacher_text import TEACHER_TEXT, sample_teacher_windows
from .tensor_files import save_tensors_atomic
from .skips import Shortcut, is_orthogonal

__all__ = ["HEAL_MODES", "HealConfig", "HealReport", "heal_model", "healed_precision", "trainable_parameters", "restore_parameters",
           "heal_windows",
           "stream_bases", "topk_kl"]

log = logging.getLogger(__name__)

HEAL_MODES = ("blockwise", "e2e")
DEFAULT_LR = {"blockwise": 1e-4, "e2e": 5e-5}
#: the evaluation protocol reads the Jargon File's first 102,400 tokens: never train on them
JARGON_EVAL_TOKENS = 102_400


@dataclass
class HealConfig:
    """What healing does; every field has a CLI flag of the same name (``--heal-<field>`` on run/compress)."""

    tokens: int = 32_768          # training tokens (blockwise: each layer sees each once per epoch)
    mode: str = "e2e"             # measured better than blockwise at equal tokens (docs/healing.md)
    text: str = "mix"             # training text: mix, kjv, teacher (sampled from it), a file, or name@N (skip N tokens)
    seq_len: int = 1024           # the evaluation's window: 256 left later positions untrained (docs/healing.md)
    batch_size: int = 1           # sequences per optimizer step (1,024 tokens, as 4 x 256 before)
    lr: float | None = None       # None: DEFAULT_LR[mode]
    epochs: int = 1               # blockwise: passes over the training tokens per layer
    heldout_tokens: int = 4_096   # held-out slice of the training text, scored for early stopping
    eval_every: int = 16          # e2e: optimizer steps between held-out scores
    patience: int = 4             # held-out scores without improvement before stopping
    topk: int = 64                # e2e: teacher probabilities cached per token
    seed: int = 0
    quantize: str = "none"        # e2e: train through the int4/int8 rounding `export --quantize` will apply
    quantize_block: int = 32      # its block size (the exporter's --quantize-block)
    # how to run, not what to compute: left out of equality and settings()
    device: str = field(default="cpu", compare=False)
    threads: int = field(default_factory=lambda: os.cpu_count() or 2, compare=False)

    def validate(self) -> None:
        if self.mode not in HEAL_MODES:
            raise UserError(f"--heal-mode {self.mode!r} is not one of {', '.join(HEAL_MODES)}")
        for name in ("tokens", "heldout_tokens"):
            if getattr(self, name) < 0:
                raise UserError(f"--heal-{name.replace('_', '-')} {getattr(self, name)} is negative: give 0 or more")
        for name in ("seq_len", "batch_size", "epochs", "eval_every", "patience", "topk", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"--heal-{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.weight_quant is not None and self.mode != "e2e":
            raise UserError(f"--heal-quantize {self.quantize} trains end to end: add --heal-mode e2e")
        if self.quantize_block < 16 or self.quantize_block & (self.quantize_block - 1):
            raise UserError(f"--heal-quantize-block {self.quantize_block} must be a power of two, at least 16")
        if self.lr is not None and not (0 < self.lr < 1):
            raise UserError(f"--heal-lr {self.lr:g} must be in (0, 1), e.g. 5e-5")
        check_device(self.device)
        name, _, skip = self.text.rpartition("@") if "@" in self.text else (self.text, "", "0")
        if name == "jargon" and (not skip.isdigit() or int(skip) < JARGON_EVAL_TOKENS):
            raise UserError(f"--heal-text {self.text}: the evaluation reads the Jargon File's first "
                            f"{JARGON_EVAL_TOKENS:,} tokens; train on jargon@{JARGON_EVAL_TOKENS} (the rest) or mix")

    @property
    def weight_quant(self) -> WeightQuant | None:
        return WeightQuant.named(self.quantize, self.quantize_block)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    def to_dict(self) -> dict:
        return asdict(self)

    def settings(self) -> dict:
        """The fields that decide the healed weights (as `CompressionConfig.settings`): what the main job's
        cache and a resumed run key on."""
        return result_settings(self)


@dataclass
class HealReport:
    mode: str
    tokens: int                   # training tokens used (distinct)
    tokens_seen: int              # tokens through the student (epochs and steps included)
    steps: int
    heldout_before: float         # held-out loss (e2e: KL in nats/token; blockwise: mean normalised MSE)
    heldout_after: float
    seconds: float
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- what trains

def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Structured factors, dense remainders (linears, norms, biases, non-orthogonal skips); never the token
    table (nor a head tied to it) and never an orthogonal skip, whose Cayley storage must stay exact."""
    adapter = get_adapter(model)
    frozen: set[int] = set()
    embed = get_module(model, adapter.embed_path)
    frozen.update(id(p) for p in embed.parameters())
    for module in model.modules():
        if isinstance(module, (FactoredEmbedding, FactoredHead)):
            frozen.update(id(p) for p in module.parameters())
        elif isinstance(module, Shortcut) and is_orthogonal(module.weight):
            frozen.add(id(module.weight))
    out, seen = [], set()
    for p in model.parameters():
        if id(p) not in seen and id(p) not in frozen and p.is_floating_point():
            out.append(p)
        seen.add(id(p))
    return out


def _set_trainable(model: nn.Module, params: list[nn.Parameter]) -> None:
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


# ---------------------------------------------------------------------------------------------- data

def _window_counts(config: HealConfig) -> tuple[int, int]:
    """Training and held-out windows: whole batches only, so every step is alike."""
    per_batch = config.seq_len * config.batch_size
    return (math.ceil(config.tokens / per_batch) * config.batch_size,
            math.ceil(config.heldout_tokens / per_batch) * config.batch_size)


def heal_windows(tokenizer, config: HealConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, held-out windows) of ``seq_len`` tokens: non-overlapping windows of the training
    text in a seeded random order, the held-out ones first, so the two never share a token."""
    name, skip = _split_offset(config.text)
    n_train, n_held = _window_counts(config)
    ids = tokenize_corpus(tokenizer, load_text(name), max_tokens=skip + 4_000_000)[skip:]
    n_windows = ids.numel() // config.seq_len
    if n_windows < n_train + n_held:
        raise UserError(f"--heal-text {config.text} has {ids.numel():,} tokens, fewer than the "
                        f"{(n_train + n_held) * config.seq_len:,} asked for (--heal-tokens + --heal-heldout-tokens): "
                        "lower them or pass a longer text")
    windows = ids[: n_windows * config.seq_len].view(n_windows, config.seq_len)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(config.seed))
    return windows[order[n_held: n_held + n_train]].clone(), windows[order[:n_held]].clone()


# ---------------------------------------------------------------------------------------------- the basis map

def _procrustes(m: torch.Tensor) -> torch.Tensor:
    """argmin ||A Q - B|| over Q with orthonormal columns, given M = A^T B: Q = U V^T of M's SVD."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


@torch.no_grad()
def stream_bases(student: nn.Module, teacher: nn.Module) -> list[torch.Tensor | None]:
    """Q_p for the residual positions 0..2L (d x d_p, float64), None where only the hidden states can tell."""
    sa, ta = get_adapter(student), get_adapter(teacher)
    e_c = _embedding_table(student).double()
    e_d = get_module(teacher, ta.embed_path).weight.double()
    bases: list[torch.Tensor | None] = [_procrustes(e_d.T @ e_c)]
    for layer in sa.layers():
        for skip in (getattr(layer, "attn_shortcut", None), getattr(layer, "mlp_shortcut", None)):
            prev = bases[-1]
            if skip is None:
                bases.append(prev)
            elif prev is not None and is_orthogonal(skip.weight):
                bases.append(prev @ skip.weight.double())
            else:
                bases.append(None)
    return bases


def _embedding_table(model: nn.Module) -> torch.Tensor:
    emb = get_module(model, get_adapter(model).embed_path)
    if isinstance(emb, FactoredEmbedding):
        return (emb.a @ emb.b).detach()
    return emb.weight.detach()


# ---------------------------------------------------------------------------------------------- blockwise

def _out(x) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _nmse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((y - target) ** 2).mean() / (target ** 2).mean().clamp_min(1e-12)


@torch.no_grad()
def _layer_loss(layer, xs, kw, targets) -> float:
    return sum(float(_nmse(_out(layer(x, **kw)), t)) for x, t in zip(xs, targets)) / max(len(xs), 1)


def _heal_blockwise(student, teacher, train, held, config: HealConfig, work: Path, params: list, progress: bool,
                    echo: Callable[[str], None]) -> HealReport:
    start = time.perf_counter()
    sa, ta = get_adapter(student), get_adapter(teacher)
    windows = torch.cat([train, held]) if held.numel() else train
    bs = config.batch_size
    caught = capture_layer_inputs(student, windows, bs)
    xs_c, kw_c = [x for x, _ in caught], caught[0][1]                 # every batch has bs windows: one kwargs
    caught = capture_layer_inputs(teacher, windows, bs)
    xs_d, kws_d = [x for x, _ in caught], [kw for _, kw in caught]
    n_tb = train.shape[0] // bs                                                   # training batches come first
    bases = stream_bases(student, teacher)
    keep = {id(p) for p in params}
    history, before, after, seen, steps = [], [], [], 0, 0
    bar = tqdm(total=sa.num_layers, desc="heal blockwise", unit="layer", disable=not progress)
    for i, (layer_c, layer_d) in enumerate(zip(sa.layers(), ta.layers())):
        with torch.no_grad():
            ys_d = [_out(layer_d(x, **kw)) for x, kw in zip(xs_d, kws_d)]
        q = bases[2 * i + 2]
        if q is None:  # sliced stream: fit the map on the training tokens, from the layer before healing
            with torch.no_grad():
                m = sum(_flat(y_d).T @ _flat(_out(layer_c(x, **kw_c))) for y_d, x in zip(ys_d[:n_tb], xs_c[:n_tb]))
            q = _procrustes(m)
        q = q.to(xs_c[0].dtype)
        targets = [y @ q for y in ys_d]
        lparams = [p for p in layer_c.parameters() if id(p) in keep]
        saved = work / f"heal-layer{i:03d}.safetensors"
        loss0 = _layer_loss(layer_c, xs_c[n_tb:], kw_c, targets[n_tb:]) if held.numel() else float("nan")
        if saved.exists():
            _load_params(layer_c, saved)
            record = json.loads((work / f"heal-layer{i:03d}.json").read_text())
        else:
            record = _train_layer(layer_c, lparams, xs_c[:n_tb], targets[:n_tb], xs_c[n_tb:], targets[n_tb:],
                                  kw_c, config, loss0)
            _save_params(layer_c, lparams, saved)
            _write_json(work / f"heal-layer{i:03d}.json", record)
        before.append(loss0)
        after.append(record["heldout_after"])
        seen += record["tokens_seen"]
        steps += record["steps"]
        history.append({"layer": i, **record})
        bar.set_postfix_str(f"held-out nmse {loss0:.4f} -> {record['heldout_after']:.4f}")
        bar.update(1)
        with torch.no_grad():
            xs_c = [_out(layer_c(x, **kw_c)) for x in xs_c]
        xs_d = ys_d
    bar.close()
    mean = lambda v: float(sum(v) / len(v)) if v else float("nan")  # noqa: E731
    return HealReport("blockwise", int(train.numel()), seen, steps, mean(before), mean(after),
                      round(time.perf_counter() - start, 1), history=history)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).double()


def _train_layer(layer, params, xs, targets, held_x, held_t, kw, config: HealConfig, loss0: float) -> dict:
    """Adam on one layer, cosine learning rate, best held-out state kept."""
    steps_total = config.epochs * len(xs)
    opt = torch.optim.Adam(params, lr=config.learning_rate)
    sched = _schedule(opt, steps_total)
    gen = torch.Generator().manual_seed(config.seed)
    best, best_state, step, seen, stale = loss0, _snapshot(params), 0, 0, 0
    for epoch in range(config.epochs):
        for j in torch.randperm(len(xs), generator=gen).tolist():
            with torch.enable_grad(), _autocast(config):
                loss = _nmse(_out(layer(xs[j], **kw)).float(), targets[j])
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()
            step += 1
            seen += xs[j].shape[0] * xs[j].shape[1]
        if held_x:
            held = _layer_loss(layer, held_x, kw, held_t)
            if held < best:
                best, best_state, stale = held, _snapshot(params), 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
    if held_x:
        restore_parameters(params, best_state)
    else:
        best = float("nan")
    return {"steps": step, "tokens_seen": seen, "heldout_before": loss0, "heldout_after": best}


# ---------------------------------------------------------------------------------------------- e2e

def topk_kl(student_logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token over the teacher's top-k tokens plus one bucket for the rest.

    ``top_logp``: the teacher's log-probabilities of its k most likely tokens (the rest of its mass is
    1 - sum exp(top_logp)); the student's bucket is 1 - sum of its probabilities of the same k tokens."""
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    logq_k = logq.gather(-1, top_idx.long())
    p_k = top_logp.float().exp()
    p_rest = (1 - p_k.sum(-1)).clamp_min(1e-8)
    q_rest = (1 - logq_k.exp().sum(-1)).clamp_min(1e-8)
    kl = (p_k * (top_logp.float() - logq_k)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


@torch.no_grad()
def _teacher_topk(teacher, windows: torch.Tensor, k: int, cache: Path | None, batch_size: int, progress: bool):
    """(log-probabilities, token ids) of the teacher's top-k per position, from ``cache`` when it holds them."""
    if cache is not None and cache.is_file():
        t = load_file(str(cache))
        if t["windows"].shape == windows.shape and torch.equal(t["windows"], windows.cpu()):
            return t["logp"].to(windows.device), t["idx"].to(windows.device)
    logps, idxs = [], []
    for i in tqdm(range(0, windows.shape[0], batch_size), desc="teacher top-k", disable=not progress, leave=False):
        logits = teacher(input_ids=windows[i: i + batch_size], use_cache=False).logits
        lp, ix = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
        logps.append(lp.half())
        idxs.append(ix.int())
    logp, idx = torch.cat(logps), torch.cat(idxs)
    if cache is not None:
        save_tensors_atomic({"logp": logp.cpu(), "idx": idx.cpu(), "windows": windows.cpu().contiguous()}, cache)
    return logp, idx


def _heldout_kl(student, held, logp, idx, batch_size: int) -> float:
    with torch.no_grad():
        total = 0.0
        for i in range(0, held.shape[0], batch_size):
            out = student(input_ids=held[i: i + batch_size], use_cache=False).logits
            total += float(topk_kl(out, logp[i: i + batch_size], idx[i: i + batch_size])) * out.shape[0]
        return total / max(held.shape[0], 1)


def _heal_e2e(student, teacher, teacher_id: str, train, held, config: HealConfig, work: Path, params: list,
              progress: bool, echo: Callable[[str], None], teacher_cache: Path | None) -> HealReport:
    start = time.perf_counter()
    bs = config.batch_size
    cache = lambda tag: None if teacher_cache is None else teacher_cache / f"{tag}.safetensors"  # noqa: E731
    key = _windows_key(teacher_id, train, config)
    t_logp, t_idx = _teacher_topk(teacher, train, config.topk, cache(f"train-{key}"), bs, progress)
    h_logp, h_idx = (_teacher_topk(teacher, held, config.topk, cache(f"held-{_windows_key(teacher_id, held, config)}"),
                                   bs, progress) if held.numel() else (None, None))
    n_steps = math.ceil(train.shape[0] / bs) * config.epochs
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    sched = _schedule(opt, n_steps)
    order = torch.cat([torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(config.seed + e))
                       for e in range(config.epochs)])
    state_path = work / "heal-e2e-state.pt"
    quant = config.weight_quant
    targets = quant_targets(student, quant) if quant else []
    rounded = lambda: quantized_weights(targets, quant)  # noqa: E731
    step, history, stale, stopped = 0, [], 0, False
    if not state_path.is_file():
        with rounded():
            best = before = _heldout_kl(student, held, h_logp, h_idx, bs) if held.numel() else float("nan")
        best_state = _snapshot(params)
    else:
        saved = torch.load(state_path, weights_only=False)
        restore_parameters(params, saved["params"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        step, history, stale, best, before = saved["step"], saved["history"], saved["stale"], saved["best"], saved["before"]
        best_state = saved["best_state"]
        stopped = saved.get("stopped", False)
    bar = tqdm(total=n_steps, initial=step, desc="heal e2e", unit="step", disable=not progress)
    while step < n_steps and not stopped:
        sel = order[(step * bs) % order.numel():][:bs]
        with torch.enable_grad(), _autocast(config), rounded():
            logits = student(input_ids=train[sel], use_cache=False).logits
            loss = topk_kl(logits, t_logp[sel], t_idx[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if held.numel() and (step % config.eval_every == 0 or step == n_steps):
            with rounded():
                kl = _heldout_kl(student, held, h_logp, h_idx, bs)
            history.append({"step": step, "tokens": step * bs * config.seq_len, "train_kl": float(loss.detach()),
                            "heldout_kl": kl})
            bar.set_postfix_str(f"held-out KL {kl:.4f}")
            if kl < best:
                best, best_state, stale = kl, _snapshot(params), 0
            else:
                stale += 1
                stopped = stale >= config.patience
            tmp = state_path.with_name(state_path.name + ".tmp")
            torch.save({"params": _snapshot(params), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                        "history": history, "stale": stale, "best": best, "before": before,
                        "best_state": best_state, "stopped": stopped}, tmp)
            os.replace(tmp, state_path)
    bar.close()
    if held.numel():
        restore_parameters(params, best_state)
    return HealReport("e2e", int(train.numel()), step * bs * config.seq_len, step, before, best,
                      round(time.perf_counter() - start, 1), stopped_early=stopped, history=history)


def _windows_key(teacher_id: str, windows: torch.Tensor, config: HealConfig) -> str:
    h = hashlib.sha256(windows.cpu().numpy().tobytes())
    h.update(json.dumps({"k": config.topk, "teacher": teacher_id}).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- shared

def _autocast(config: HealConfig):
    """bf16 autocast on a GPU (the optimizer and master weights stay fp32); nothing on the CPU."""
    if config.device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _schedule(opt, total: int):
    """Linear warm-up over the first 5% of steps, then cosine down to a tenth of the peak."""
    warm = max(1, total // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def restore_parameters(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    """Copy saved values (a snapshot, or a healing run's ``best_state``) into the trainable parameters, in order."""
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)


def _save_params(module: nn.Module, params: list[nn.Parameter], path: Path) -> None:
    ids = {id(p) for p in params}
    save_tensors_atomic({n: p.detach().contiguous().clone() for n, p in module.named_parameters() if id(p) in ids},
                        path)


def _load_params(module: nn.Module, path: Path) -> None:
    tensors = load_file(str(path))
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n in tensors:
                p.copy_(tensors[n])


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def heal_model(student: nn.Module, teacher: nn.Module, tokenizer, config: HealConfig, work: str | Path, *,
               windows: tuple[torch.Tensor, torch.Tensor] | None = None, teacher_cache: str | Path | None = None,
               progress: bool = True, echo: Callable[[str], None] = print) -> HealReport:
    """Heal ``student`` in place against ``teacher`` (the dense model it was compressed from).

    ``windows`` (train, held-out) replaces the config's text, e.g. in tests. Progress is checkpointed in
    ``work``: rerunning with the same arguments after an interruption resumes to the same weights."""
    config.validate()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    work = Path(work)
    _check_pair(student, teacher)
    # state left by other settings, another starting checkpoint or another teacher is dropped, never resumed
    teacher_id = model_fingerprint(teacher)  # the weights, not a name: keys the work folder and the teacher caches
    _check_settings(work, config, {"student": model_fingerprint(student), "teacher": teacher_id})
    if config.tokens == 0:  # nothing to train: the checkpoint is returned as it is
        return HealReport(config.mode, 0, 0, 0, float("nan"), float("nan"), 0.0)
    if windows is not None:
        train, held = windows
    elif config.text == TEACHER_TEXT:
        n_train, n_held = _window_counts(config)
        train, held = sample_teacher_windows(teacher, teacher_id, n_train, n_held, config.seq_len,
                                             config.seed, cache=Path(teacher_cache) if teacher_cache else None,
                                             progress=progress)
    else:
        train, held = heal_windows(tokenizer, config)
    student.eval(), teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = trainable_parameters(student)
    _set_trainable(student, params)
    if config.device == "cuda":
        student.cuda(), teacher.cuda()
        train, held = train.cuda(), held.cuda()
    try:
        if config.mode == "blockwise":
            report = _heal_blockwise(student, teacher, train, held, config, work, params, progress, echo)
        else:
            report = _heal_e2e(student, teacher, teacher_id, train, held, config, work, params, progress, echo,
                               Path(teacher_cache) if teacher_cache is not None else None)
    finally:
        for p in student.parameters():
            p.requires_grad_(False)
        if config.device == "cuda":
            student.cpu(), teacher.cpu()
    return report


def _check_pair(student: nn.Module, teacher: nn.Module) -> None:
    sa, ta = get_adapter(student), get_adapter(teacher)
    if sa.num_layers != ta.num_layers or student.config.vocab_size != teacher.config.vocab_size:
        raise UserError(f"the teacher ({ta.num_layers} layers, vocabulary {teacher.config.vocab_size}) is not the "
                        f"model this checkpoint was compressed from ({sa.num_layers} layers, vocabulary "
                        f"{student.config.vocab_size}): pass the original dense model as --model")


# ---------------------------------------------------------------------------------------------- driver

def heal_checkpoint(checkpoint: str | Path, out: str | Path, teacher: nn.Module, tokenizer, config: HealConfig, *,
                    teacher_cache: str | Path | None = None, overwrite: bool = False, progress: bool = True,
                    echo: Callable[[str], None] = print) -> Path:
    """Heal a compressed checkpoint folder into ``out`` (same tensor names, shapes and count). Resumable:
    progress lives in the sibling ``.<out>.heal-work`` until the healed checkpoint is complete."""
    from .checkpoint import load_compressed, require_checkpoint, save_compressed
    from .compress import saved_param_count

    config.validate()
    checkpoint = require_checkpoint(checkpoint)
    out = check_output(out, inputs=[checkpoint], overwrite=overwrite)
    student, ck_tokenizer = load_compressed(checkpoint)
    tokenizer = tokenizer or ck_tokenizer
    if tokenizer is None and config.tokens:
        raise UserError(f"{checkpoint} has no tokenizer files and none was given: heal needs one for its text")
    work = out.parent / f".{out.name}.heal-work"
    report = heal_model(student, teacher, tokenizer, config, work, teacher_cache=teacher_cache, progress=progress,
                        echo=echo)
    state = student.config.procrustes
    healing = list(state.pop("healing", []))
    healing.append({"config": config.to_dict(), "report": {k: v for k, v in report.to_dict().items() if k != "history"}})
    source = (read_identity(checkpoint) or {}).get("source")
    save_compressed(student, out, tokenizer=ck_tokenizer, extra_config={"healing": healing}, source=source)
    _write_json(out / "healing.json", {"config": config.to_dict(), "report": report.to_dict()})
    register(out, ["healing.json"])
    shutil.rmtree(work, ignore_errors=True)
    before, after = saved_param_count(checkpoint), saved_param_count(out)
    if before != after:
        raise RuntimeError(f"healing changed the stored parameter count {before} -> {after}")
    echo(f"healed {out}: {report.mode}, {report.tokens:,} training tokens ({report.tokens_seen:,} seen), held-out "
         f"{'KL' if report.mode == 'e2e' else 'layer nmse'} {report.heldout_before:.4f} -> {report.heldout_after:.4f}, "
         f"{report.seconds:.0f} s")
    return out


def healed_precision(checkpoint: str | Path) -> tuple[str, int, bool] | None:
    """(precision, block size, symmetric) the checkpoint's last healing trained through, None if float."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        return None
    healing = json.loads(path.read_text()).get("procrustes", {}).get("healing") or [{}]
    config = healing[-1].get("config", {})
    quantize = config.get("quantize", "none")
    return None if quantize == "none" else (quantize, int(config.get("quantize_block", HealConfig.quantize_block)), True)


def _check_settings(work: Path, config: HealConfig, identity: dict[str, str]) -> None:
    """A resumed run must have the same settings, starting weights and teacher as the one that left ``work``;
    else its state is dropped. A file saved by an older version is read with the settings added since at their
    defaults (a setting that did not exist then was at its default) and, where it recorded no fingerprints,
    trusted as before, so upgrading the tool never throws a long run's progress away."""
    saved = work / "heal-config.json"
    wanted = {**config.settings(), **identity}
    if saved.is_file() and {**HealConfig().settings(), **identity, **json.loads(saved.read_text())} != wanted:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    _write_json(saved, wanted)
