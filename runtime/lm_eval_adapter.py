"""An lm-eval 0.4.13 model over the ONNX artifact, registered as "procrustes-onnx", plus `run_eval`.

Tokenization, context/continuation splitting and rolling windows reuse lm-eval's own helpers exactly as
its `hf` model does, so the two agree on the same tasks; only the forward pass runs in ONNX Runtime.
`generate_until` decodes with the KV cache. The offline local tasks live in runtime/tasks (docs/tasks.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (_add_special_kwargs, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text, resolve_max_length)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm
from transformers import AutoConfig

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.runtime.generate import SamplingConfig, pick_token
from procrustes_onnx.runtime.session import OnnxCausalLM, tokenizer_for_onnx
from procrustes_onnx.runtime.tasks.local_tasks import LOCAL_TASKS, TASK_DIR

__all__ = ["OnnxLM", "run_eval", "check_tasks", "LOCAL_TASKS", "TASK_DIR"]

logger = logging.getLogger(__name__)


def _score(logits: np.ndarray, target: np.ndarray) -> tuple[float, bool]:
    """(sum of log p(target) in float64, whether argmax reproduces every target) from logits [T, V].

    Only the normaliser needs the whole row, so the [T, V] log-softmax is never materialised."""
    m = logits.max(axis=-1, keepdims=True)
    log_z = m[:, 0].astype(np.float64) + np.log(np.exp(logits - m).sum(axis=-1, dtype=np.float64))
    picked = logits[np.arange(len(target)), target].astype(np.float64)
    return float((picked - log_z).sum()), bool((logits.argmax(-1) == target).all())


@register_model("procrustes-onnx")
class OnnxLM(TemplateLM):
    """lm-eval model args: pretrained=<artifact folder or model.onnx>, threads, device, max_length."""

    def __init__(self, pretrained: str | OnnxCausalLM, threads: int | None = None, device: str = "cpu",
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 tokenizer=None, batch_size: int | str = 1, **_: Any) -> None:
        super().__init__()

        self.lm = pretrained if isinstance(pretrained, OnnxCausalLM) else OnnxCausalLM(
            pretrained, device, int(threads) if threads else None)
        self.tokenizer = tokenizer or tokenizer_for_onnx(self.lm.path)
        folder = self.lm.path.parent
        config = AutoConfig.from_pretrained(folder) if (folder / "config.json").is_file() else None
        self._max_length = int(max_length) if max_length else resolve_max_length(config, self.tokenizer)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        if self.tokenizer.eos_token_id is None:
            raise UserError(f"the tokenizer beside {self.lm.path} has no EOS token: save one with the tokenizer")

    # -- what TemplateLM needs --------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """As lm-eval's HFLM.tok_encode: the tokenizer's own special-token default unless told otherwise."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
        """Sum of continuation log-probs and whether greedy decoding reproduces it, one request at a time.

        Consecutive requests with the same context (the choices of one multiple-choice item) prefill the
        context once and score each continuation from its KV cache."""
        out: list[tuple[float, bool]] = []
        last_context, prefix = None, None
        for _, context_enc, continuation_enc in tqdm(requests, disable=disable_tqdm, desc="loglikelihood"):
            if not continuation_enc:
                raise UserError("an lm-eval request has an empty continuation: check the task's doc_to_choice")
            target = np.asarray(continuation_enc)
            fits = 0 < len(context_enc) and len(context_enc) + len(continuation_enc) <= self.max_length
            if fits and self.lm.has_cache:
                if list(context_enc) != last_context:
                    last_context, prefix = list(context_enc), self.lm.prefill(np.asarray([context_enc], np.int64))
                logits, cache = prefix  # [1, V]: predicts the first continuation token
                if len(continuation_enc) > 1:
                    rest = self.lm.forward(np.asarray([continuation_enc[:-1]], np.int64), cache)[0][0]
                    logits = np.concatenate([logits, rest], axis=0)
            else:
                full = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
                logits = self.lm.logits(np.asarray([full[:-1]], np.int64))[0][-len(target):]
            out.append(_score(logits, target))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over disjoint max_length windows, as HFLM computes it."""
        results = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="loglikelihood_rolling"):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            results.append(sum(s for s, _ in scores))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample/temperature) decoding with the KV cache until a stop string."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="generate_until"):
            kwargs = normalize_gen_kwargs(gen_kwargs, self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = kwargs.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise UserError(f"max_gen_toks {max_gen} must be below the model's {self.max_length} positions")
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            config = SamplingConfig(max_new_tokens=max_gen, temperature=temperature,
                                    top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0))
            results.append(postprocess_generated_text(self._generate(ids, config, until), until, None))
        return results

    def _generate(self, prompt: list[int], config: SamplingConfig, until: list[str]) -> str:
        rng = np.random.default_rng(config.seed)
        logits, cache = self.lm.prefill(np.asarray([prompt], np.int64))
        tokens: list[int] = []
        while True:
            token = pick_token(logits[0], config, rng)
            if token == self.eot_token_id:
                break
            tokens.append(token)
            text = self.tok_decode(tokens)
            if len(tokens) >= config.max_new_tokens or any(s and s in text for s in until):
                return text
            logits, cache = self.lm.decode_step(np.array([token]), cache)
        return self.tok_decode(tokens)


def _task_manager(tasks: list[str] | str):
    """(task names, an lm-eval TaskManager that knows them all); unknown names are a UserError."""
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise UserError("no tasks given: pass --tasks, e.g. --tasks " + ",".join(LOCAL_TASKS))
    local_only = all(t in (*LOCAL_TASKS, "procrustes_local") for t in names)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=not local_only)  # indexing all: ~15 s
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}: local tasks are {', '.join(LOCAL_TASKS)} "
                        "(group procrustes_local); see `lm_eval ls tasks` for the rest")
    return names, manager


def check_tasks(tasks: list[str] | str) -> None:
    """Refuse unknown task names up front (the main job evaluates only after an hour of other stages);
    local names are known without indexing lm-eval's own tasks."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if names and all(t in (*LOCAL_TASKS, "procrustes_local") for t in names):
        return
    _task_manager(names)


def run_eval(onnx_path: str | Path | OnnxCausalLM, tasks: list[str] | str, *, limit: int | float | None = None,
             num_fewshot: int | None = None, threads: int | None = None, device: str = "cpu",
             max_length: int | None = None, output: str | Path | None = None, log_samples: bool = False,
             seed: int = 0) -> dict:
    """Evaluate the ONNX artifact on lm-eval tasks (the local ones included) -> {"results", "versions", ...}.

    Tasks whose data is not on this machine fail with a UserError naming the task."""
    import lm_eval

    names, manager = _task_manager(tasks)
    model = OnnxLM(onnx_path, threads=threads, device=device, max_length=max_length)
    try:
        raw = lm_eval.simple_evaluate(model=model, tasks=names, limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, log_samples=log_samples, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      bootstrap_iters=0)
    except (ConnectionError, OSError, FileNotFoundError) as exc:
        raise UserError(f"a task's data is not available offline ({type(exc).__name__}: {str(exc)[:120]}): "
                        f"use the local tasks {', '.join(LOCAL_TASKS)}") from None
    summary = {k: raw[k] for k in ("results", "versions", "n-shot", "n-samples") if k in raw}
    summary["model"] = {"onnx": str(model.lm.path), **vars(model.lm.info)}
    summary["limit"] = limit
    if log_samples:
        summary["samples"] = raw.get("samples")
    if output:
        out = Path(output)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        tmp.replace(out)
    return summary
