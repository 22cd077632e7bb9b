"""ONNX Runtime sessions for exported causal LMs: provider choice, threads, optimization level, KV cache.

One `OnnxCausalLM` wraps one session and hides the optimum-style I/O (`input_ids`, `attention_mask`,
`position_ids`, `past_key_values.{i}.key|value` -> `logits`, `present.{i}.key|value`), so perplexity,
generation, lm-eval and the benchmark all drive the graph the same way. On CUDA the KV cache stays on
the device through IOBinding; on CPU it is plain numpy.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from procrustes_onnx.core.artifacts import check_external_data
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.graph_io import ATTENTION_KEY, decoder_feeds, empty_past, past_layout, past_names, token_ids
from procrustes_onnx.core.sources import load_tokenizer

__all__ = ["SessionInfo", "KVCache", "OnnxCausalLM", "create_session", "resolve_onnx_path", "providers_for",
           "max_positions", "tokenizer_for_onnx"]

logger = logging.getLogger(__name__)

OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass
class SessionInfo:
    """How a session was made, recorded next to every benchmark number."""

    path: str
    device: str
    providers: list[str]
    threads: int | None
    opt_level: str
    create_seconds: float


def resolve_onnx_path(path: str | Path) -> Path:
    """An artifact folder (holding model.onnx) or an .onnx file -> the .onnx file."""
    p = Path(path)
    if p.is_dir():
        candidates = [p / "model.onnx"] if (p / "model.onnx").is_file() else sorted(p.glob("*.onnx"))
        if len(candidates) != 1:
            raise UserError(f"{p} holds {len(candidates)} .onnx files, not one model.onnx: pass the .onnx file itself")
        return candidates[0]
    if not p.is_file():
        raise UserError(f"ONNX model {p} does not exist: pass an exported artifact folder or its model.onnx")
    return p


def check_onnx_files(path: str | Path) -> Path:
    """``resolve_onnx_path``, plus: the external-data files the graph names exist (one clear line if not)."""
    onnx_path = resolve_onnx_path(path)
    check_external_data(onnx_path)
    return onnx_path


def max_positions(onnx_path: str | Path) -> int | None:
    """`max_position_embeddings` from the config.json exported beside the model, if there is one."""
    config = resolve_onnx_path(onnx_path).parent / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("max_position_embeddings")


def tokenizer_for_onnx(path: str | Path):
    """The tokenizer saved next to model.onnx (the exporter copies it there)."""
    return load_tokenizer(resolve_onnx_path(path).parent)


def providers_for(device: str) -> list[str]:
    """Execution providers for `device`; CUDA without onnxruntime's CUDA build warns once and falls back to CPU."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise UserError(f"unknown device {device!r}: use cpu or cuda")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    warnings.warn("CUDA requested but this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); "
                  "running on CPU", RuntimeWarning, stacklevel=3)
    return ["CPUExecutionProvider"]


def _opt_level(level: str | int):
    table = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 0: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
             "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, 1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
             "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
             2: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
             "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 99: ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in table:
        raise UserError(f"unknown graph optimization level {level!r}: use one of {', '.join(OPT_LEVELS)}")
    return table[level]


def create_session(path: str | Path, device: str = "cpu", threads: int | None = None,
                   opt_level: str | int = "all", optimized_model_path: str | None = None):
    """An `onnxruntime.InferenceSession` plus a `SessionInfo` with the time its creation took.

    `threads=None` lets ORT choose; a corrupt or foreign file becomes a one-line UserError."""
    onnx_path = check_onnx_files(path)
    providers = providers_for(device)
    options = ort.SessionOptions()
    options.graph_optimization_level = _opt_level(opt_level)
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads {threads} must be at least 1")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    options.log_severity_level = 3
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises several pybind types (InvalidProtobuf, Fail, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"ONNX Runtime cannot load {onnx_path} ({first[:200]}): re-export it with "
                        "`procrustes-onnx export`") from None
    seconds = time.perf_counter() - start
    used = "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
    info = SessionInfo(str(onnx_path), used, session.get_providers(), threads,
                       opt_level if isinstance(opt_level, str) else str(opt_level), seconds)
    logger.info("session for %s on %s in %.2f s", onnx_path, used, seconds)
    return session, info


@dataclass
class KVCache:
    """Per-layer key/value tensors (numpy on CPU, OrtValues on CUDA), the attention mask and next positions."""

    tensors: dict[str, Any]  # past_key_values.{i}.key|value -> [B, kv_heads, past, head_dim]
    attention_mask: np.ndarray  # [B, past] int64, 0 where a row is left-padded
    length: int = 0
    extra: dict = field(default_factory=dict)


def _folder_head_size(folder: Path) -> int | None:
    """Head size from the folder's genai_config.json or config.json, for graphs that leave it symbolic."""
    try:
        if (folder / "genai_config.json").is_file():
            return int(json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"])
        config = json.loads((folder / "config.json").read_text())
        return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


class OnnxCausalLM:
    """A thin causal-LM wrapper around one session: full logits, prefill and single-token decode."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None,
                 opt_level: str | int = "all") -> None:
        self.session, self.info = create_session(path, device, threads, opt_level)
        self.path = Path(self.info.path)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if "input_ids" not in inputs or "logits" not in outputs:
            raise UserError(f"{self.path} is not a causal-LM export (inputs {sorted(inputs)[:4]}, outputs "
                            f"{outputs[:3]}): it needs input_ids -> logits; export it with `procrustes-onnx export`")
        self.input_names = set(inputs)
        self.kv_names = past_names(inputs)
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.kv_names]
        missing = [n for n in self.present_names if n not in outputs]
        if missing:
            raise UserError(f"{self.path} has past inputs but no {missing[0]} output: re-export it with_past=True")
        self.output_names = ["logits", *self.present_names]
        symbolic = any(len(s) == 4 and not isinstance(s[3], int) for s in (inputs[n].shape for n in self.kv_names))
        head_size = _folder_head_size(self.path.parent) if symbolic else None  # read only when the graph needs it
        self._kv_shape, self._kv_dtype = past_layout(list(inputs.values()), str(self.path), head_size)
        self.device = self.info.device
        self.create_seconds = self.info.create_seconds
        meta = self.session.get_modelmeta().custom_metadata_map
        self.attention = meta.get(ATTENTION_KEY, "unfused")

    @property
    def has_cache(self) -> bool:
        return bool(self.kv_names)

    def empty_cache(self, batch: int) -> KVCache:
        return KVCache(empty_past(self._kv_shape, self._kv_dtype, batch), np.zeros((batch, 0), np.int64), 0)

    def _run(self, feeds: dict[str, Any], keep_on_device: bool) -> tuple[np.ndarray, dict[str, Any]]:
        """One session run -> (logits, presents keyed by past input name); on CUDA the presents stay on the device as OrtValues (IOBinding)."""
        if self.device != "cuda":
            out = self.session.run(self.output_names, feeds)
            return out[0], dict(zip(self.kv_names, out[1:]))
        binding = self.session.io_binding()  # pragma: no cover - needs a GPU
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cuda" if keep_on_device else "cpu")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        presents = dict(zip(self.kv_names, values[1:]))  # keyed by the past input they feed next
        if not keep_on_device:
            presents = {k: v.numpy() for k, v in presents.items()}
        return values[0].numpy(), presents

    def forward(self, input_ids: np.ndarray, cache: KVCache | None = None,
                attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, KVCache]:
        """Logits [B, T, V] for `input_ids` [B, T] after `cache`; returns the extended cache.

        `attention_mask` [B, T] marks padding in the new tokens (left padding only); positions count
        only unmasked tokens, as transformers does."""
        ids = token_ids(input_ids)
        batch, seq = ids.shape
        cache = cache if cache is not None else self.empty_cache(batch)
        feeds, mask = decoder_feeds(self.input_names, ids, cache.tensors, cache.attention_mask, attention_mask)
        if self.attention == "gqa" and not mask.all():
            raise UserError(f"{self.path} has fused GroupQueryAttention, which takes no padding inside a row (a "
                            "left-padded batch): run the prompts one at a time, or export with --attention unfused")
        logits, presents = self._run(feeds, keep_on_device=self.device == "cuda")
        return logits, KVCache(presents, mask, cache.length + seq)

    def logits(self, input_ids) -> np.ndarray:
        """Logits of a whole sequence with an empty past (the perplexity path)."""
        return self.forward(np.asarray(input_ids))[0]

    def prefill(self, input_ids, attention_mask=None) -> tuple[np.ndarray, KVCache]:
        """Run the prompt; returns the last position's logits [B, V] and the cache."""
        logits, cache = self.forward(np.asarray(input_ids), None, attention_mask)
        if not self.has_cache:
            cache.extra["ids"] = np.asarray(input_ids, np.int64)
        return logits[:, -1], cache

    def decode_step(self, token_ids, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Append one token per row [B] or [B, 1]; returns its logits [B, V] and the cache.

        Without KV inputs in the graph the whole sequence is recomputed (slow but correct)."""
        tokens = np.asarray(token_ids, np.int64).reshape(-1, 1)
        if not self.has_cache:
            seq = np.concatenate([cache.extra["ids"], tokens], axis=1)
            logits = self.forward(seq, None, np.concatenate([cache.attention_mask, np.ones_like(tokens)], 1))[0]
            return logits[:, -1], KVCache({}, np.concatenate([cache.attention_mask, np.ones_like(tokens)], 1),
                                          seq.shape[1], {"ids": seq})
        logits, cache = self.forward(tokens, cache)
        return logits[:, -1], cache
