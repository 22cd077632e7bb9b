"""config.json and tokenizer_config.json that transformers 4.x (what optimum-onnx pins) reads as well as 5.x.

transformers 5 saves ``"tokenizer_class": "TokenizersBackend"``, a class 4.x does not have: its
AutoTokenizer then falls back to a generic fast tokenizer that returns ``token_type_ids``, which
``generate`` refuses. ``PreTrainedTokenizerFast`` exists in both and reads the same tokenizer.json;
``model_input_names`` keeps ``token_type_ids`` out. transformers 5 also keeps RoPE's base in
``rope_parameters``, which 4.x ignores (it would use its default base, a different model), so
``rope_theta`` (and ``rope_scaling``, ``partial_rotary_factor``) are written at the top level as well;
5.x takes the values in ``rope_parameters`` first, so it reads the same model.

Low in the layering (stdlib only), so that both the exporter and the structured rewrite can use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["hf_compatible_files"]

TOKENIZER_CLASS = "PreTrainedTokenizerFast"
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _config(config: dict[str, Any]) -> dict[str, Any]:
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:  # absent, or nested per layer type
        return config
    out = dict(config)
    out.setdefault("rope_theta", rope["rope_theta"])
    if "partial_rotary_factor" in rope:
        out.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", "default") != "default" and out.get("rope_scaling") is None:
        out["rope_scaling"] = scaling
    return out


def _tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "tokenizer_class": TOKENIZER_CLASS, "model_input_names": MODEL_INPUT_NAMES}


def hf_compatible_files(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """File name -> new content for the folder's config.json and tokenizer_config.json (only those it has;
    the tokenizer only when a tokenizer.json backs the fast class)."""
    folder = Path(folder)
    out = {}
    config = _read(folder / "config.json")
    if config is not None:
        out["config.json"] = _config(config)
    tokenizer = _read(folder / "tokenizer_config.json")
    if tokenizer is not None and (folder / "tokenizer.json").is_file():
        out["tokenizer_config.json"] = _tokenizer_config(tokenizer)
    return out
