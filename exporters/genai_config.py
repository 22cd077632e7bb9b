"""genai_config.json: what onnxruntime-genai's ``og.Model(folder)`` reads beside model.onnx.

onnxruntime-genai does not look at config.json; without this file it stops at "Error opening
genai_config.json". The file is derived from the folder's config.json and generation_config.json, and the
decoder's input and output names are read from the graph itself, so a renamed or logits-only graph is
described as it is. ``past_present_share_buffer`` is true only for a graph with fused GroupQueryAttention
(``--attention gqa``), which writes the new keys and values into a fixed-size buffer in place, as the
builder's graph does; the unfused graph concatenates the past with the new keys and values (a growing
cache), and a shared fixed-size buffer fails at the first Concat.

Low in the layering (stdlib, onnx_ir and transformers' config classes only), so that both the exporter
and the structured rewrite can write it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import onnx_ir as ir
from transformers import AutoConfig

__all__ = ["GENAI_CONFIG", "genai_config", "write_runtime_files"]

GENAI_CONFIG = "genai_config.json"
_LAYER = re.compile(r"\d+")
# generation_config.json key -> (genai search key, the value when the file does not set it)
_SEARCH = {"do_sample": ("do_sample", False), "num_beams": ("num_beams", 1),
           "num_return_sequences": ("num_return_sequences", 1), "temperature": ("temperature", 1.0),
           "top_k": ("top_k", 50), "top_p": ("top_p", 1.0), "repetition_penalty": ("repetition_penalty", 1.0),
           "length_penalty": ("length_penalty", 1.0), "no_repeat_ngram_size": ("no_repeat_ngram_size", 0),
           "diversity_penalty": ("diversity_penalty", 0.0), "min_length": ("min_length", 0)}


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _model_config(folder: Path) -> Any:
    """transformers' config of the folder (it maps GPT-2's ``n_embd`` etc. to the common names), or the
    raw config.json where transformers does not know the model type."""
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError):
        return SimpleNamespace(**_read(folder / "config.json"))


def _per_layer(names: list[str], layers: int) -> dict[str, str]:
    """Printf templates (``past_key_values.%d.key``) of the names that exist once per layer, keyed by the
    name with the layer left out, e.g. ``past_key_values..key``."""
    found: dict[str, set[str]] = {}
    for name in names:
        for m in _LAYER.finditer(name):
            template = f"{name[:m.start()]}%d{name[m.end():]}"
            found.setdefault(template, set()).add(name)
    return {t.replace("%d", ""): t for t, got in found.items()
            if layers and got == {t % i for i in range(layers)}}


def _kv_names(names: list[str], layers: int, prefix: str) -> dict[str, str]:
    """``{prefix}_key_names``/``{prefix}_value_names`` templates of the per-layer cache names."""
    out = {}
    for stripped, template in _per_layer(names, layers).items():
        for part in ("key", "value"):
            if stripped.endswith(f".{part}") or stripped.endswith(f"_{part}"):
                out[f"{prefix}_{part}_names"] = template
    return out


def _static(value: ir.Value | None, axis: int) -> int | None:
    if value is None or value.shape is None or len(value.shape) <= axis:
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def genai_config(folder: str | os.PathLike, graph: ir.Graph, filename: str = "model.onnx") -> dict[str, Any]:
    """The genai_config.json for the decoder ``graph`` saved as ``folder/filename``, from the folder's
    config.json and generation_config.json (already written there)."""
    folder = Path(folder)
    config = _model_config(folder)
    generation = _read(folder / "generation_config.json")
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    past = next((inputs[t % 0] for t in _per_layer(list(inputs), layers or 0).values()), None)
    head_size = _first(_static(past, 3), getattr(config, "head_dim", None),
                       hidden // heads if hidden and heads else None)
    kv_heads = _first(_static(past, 1), getattr(config, "num_key_value_heads", None), heads)
    context = _first(getattr(config, "max_position_embeddings", None), generation.get("max_length"))
    eos = _first(generation.get("eos_token_id"), getattr(config, "eos_token_id", None))
    eos_list = eos if isinstance(eos, list) else [eos] if eos is not None else []
    logits = "logits" if "logits" in outputs else next(iter(outputs), None)
    decoder_inputs = {k: k for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    decoder_outputs = {"logits": logits} if logits is not None else {}
    search = {key: generation.get(src, default) for src, (key, default) in _SEARCH.items()}
    search.update(max_length=_first(generation.get("max_length"), context), early_stopping=True,
                  past_present_share_buffer=any(n.op_type == "GroupQueryAttention" for n in graph))
    return {
        "model": {
            "type": getattr(config, "model_type", None),
            "bos_token_id": _first(generation.get("bos_token_id"), getattr(config, "bos_token_id", None)),
            "eos_token_id": eos,
            "pad_token_id": _first(generation.get("pad_token_id"), getattr(config, "pad_token_id", None),
                                   eos_list[0] if eos_list else None),
            "context_length": context,
            "vocab_size": _first(_static(outputs.get(logits), 2), getattr(config, "vocab_size", None)),
            "decoder": {
                "filename": filename,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": head_size,
                "hidden_size": hidden,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": layers,
                "inputs": {**decoder_inputs, **_kv_names(list(inputs), layers or 0, "past")},
                "outputs": {**decoder_outputs, **_kv_names(list(outputs), layers or 0, "present")},
            },
        },
        "search": search,
    }


def write_runtime_files(folder: Path, graph: ir.Graph, *, src: Path | None = None, extra: tuple[str, ...] = ()) -> None:
    """The files a runtime reads beside model.onnx, for a folder being written: the side files copied from
    ``src`` (plus ``extra``), config/tokenizer files that transformers 4.x and 5.x both read, and
    genai_config.json rebuilt from ``graph`` (so a folder made from an older export gets one too)."""
    import shutil

    from procrustes_onnx.core.artifacts import SIDE_FILES, write_json

    from .hf_compat import hf_compatible_files

    for name in (SIDE_FILES + extra) if src is not None else ():
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
    for name, data in hf_compatible_files(folder).items():
        write_json(folder / name, data)
    write_json(folder / GENAI_CONFIG, genai_config(folder, graph))
