"""The compressed checkpoint folder: config.json (with a `procrustes` section), model.safetensors,
structure.json (manifest) and the tokenizer, written atomically; and loading it back into torch.

Tensors are saved under their module paths. StructuredLinear factors are `<path>.matrix.<factor>`;
square skips are stored as Cayley pairs `<path>.cayley_upper` (d(d-1)/2) and `<path>.cayley_signs`
(d), rectangular ones as `<path>.weight`. A tied LM head is saved once, as the embedding.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.outputs import atomic_output_dir, file_sha256, identity_id, read_identity, write_identity
from procrustes_onnx.core.sources import (DEFAULT_MODEL, is_compressed_checkpoint, load_tokenizer, require_dense,
                                          resolve_model_dir)
from procrustes_onnx.ops import StructuredLinear, structured_from_spec
from procrustes_onnx.ops.linear import stand_in_linear
from procrustes_onnx.ops.embedding import FactoredEmbedding, FactoredHead

from .adapters import get_adapter, get_module, set_module, surgery_state
from .embeddings import install_factored_embedding
from .fusion import install_fused_modules
from .positions import position_dims
from .skips import Shortcut, cayley_decode, cayley_encode, install_shortcuts, is_orthogonal, stored_parameter_count
from .stream import ShardReader, empty_model

__all__ = ["load_model", "save_compressed", "write_checkpoint", "collect_tensors", "merge_safetensors", "save_compressed_into", "load_compressed", "load_stand_ins", "StandIns",
           "require_checkpoint",
           "checkpoint_identity", "materialize_dense", "replace_linear", "FORMAT_VERSION"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def replace_linear(model: nn.Module, name: str, module: nn.Module) -> None:
    """Swap the linear at path `name` for `module` (same in/out features), e.g. a StructuredLinear."""
    old = get_module(model, name)
    shape_old = (getattr(old, "in_features", None), getattr(old, "out_features", None))
    shape_new = (getattr(module, "in_features", None), getattr(module, "out_features", None))
    if shape_old != shape_new:
        raise UserError(f"replacement for {name} maps {shape_new[0]} -> {shape_new[1]} features but the module it "
                        f"replaces maps {shape_old[0]} -> {shape_old[1]}; build it with matching shapes")
    set_module(model, name, module)


def _collect(model: nn.Module, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors to save, manifest) for a model after surgery, or for one of its modules at path ``prefix``
    (a streamed save collects it module by module)."""
    tensors: dict[str, torch.Tensor] = {}
    manifest: dict = {"format": FORMAT_VERSION, "structured": {}, "shortcuts": {}}
    handled: set[int] = set()
    for path, module in model.named_modules(prefix=prefix):
        if isinstance(module, StructuredLinear):
            names = {}
            for factor, t in module.matrix.factors().items():
                names[factor] = f"{path}.matrix.{factor}"
                tensors[names[factor]] = t
                handled.add(id(t))
            bias = None
            if module.bias is not None:
                bias = f"{path}.bias"
                tensors[bias] = module.bias
                handled.add(id(module.bias))
            manifest["structured"][path] = {"spec": module.matrix.spec(), "tensors": names, "bias": bias}
        elif isinstance(module, Shortcut):
            w = module.weight.detach()
            handled.add(id(module.weight))
            d_in, d_out = w.shape
            if is_orthogonal(w):
                store = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
                upper, signs = (t.to(store) for t in cayley_encode(w))
                tensors[f"{path}.cayley_upper"], tensors[f"{path}.cayley_signs"] = upper, signs
                entry = {"shape": [d_in, d_out], "storage": "cayley",
                         "tensors": [f"{path}.cayley_upper", f"{path}.cayley_signs"]}
            else:
                tensors[f"{path}.weight"] = w
                entry = {"shape": [d_in, d_out], "storage": "dense", "tensors": [f"{path}.weight"]}
            manifest["shortcuts"][path] = entry
        elif isinstance(module, FactoredEmbedding) and "embedding" not in manifest:
            manifest["embedding"] = {"path": path, "shape": [module.num_embeddings, module.embedding_dim],
                                     "rank": module.rank, "tied": False, "head": None,
                                     "tensors": {"a": f"{path}.a", "b": f"{path}.b"}}
            tensors[f"{path}.a"], tensors[f"{path}.b"] = module.a, module.b
            handled.update((id(module.a), id(module.b)))
        elif isinstance(module, FactoredHead) and "embedding" in manifest:
            manifest["embedding"].update(tied=True, head=path)
    for name, p in model.named_parameters(prefix=prefix):  # dense remainder; tied parameters appear once
        if id(p) not in handled:
            tensors[name] = p
            handled.add(id(p))
    return tensors, manifest


def collect_tensors(module: nn.Module, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, manifest entries) of one module of a compressed model at path ``prefix``: its share of
    what `save_compressed` writes, for a save that streams the model a module at a time."""
    return _collect(module, prefix)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors`` bytes with the JSON header re-serialized with sorted keys: the library writes its
    metadata map in hash order, so identical tensors gave different bytes from run to run. Offsets refer
    to the data after the header and the header keeps its padded length, so only the order changes."""
    blob = safetensors_bytes(tensors, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) <= n:
        blob = blob[:8] + header + b" " * (n - len(header)) + blob[8 + n:]
    path.write_bytes(blob)


def merge_safetensors(parts: Sequence[Path], path: Path, metadata: dict[str, str]) -> int:
    """Write the tensors of the safetensors files ``parts`` into one file ``path`` (names in order, header
    keys sorted as `_save_safetensors` writes them), one tensor in memory at a time; returns the numbers
    stored. How a streamed compression writes model.safetensors without holding the model."""
    where, header, offset = {}, {}, 0
    for part in parts:
        with safe_open(str(part), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shape, dtype = list(sl.get_shape()), sl.get_dtype()
                where[key] = part
                size = math.prod(shape) * _BYTES[dtype]
                header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
    names = sorted(header)
    offset = 0
    for key in names:                                   # data in name order
        size = header[key]["data_offsets"][1] - header[key]["data_offsets"][0]
        header[key]["data_offsets"] = [offset, offset + size]
        offset += size
    blob = json.dumps({"__metadata__": metadata, **header}, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    numbers = 0
    with open(path, "wb") as out:
        out.write(len(blob).to_bytes(8, "little"))
        out.write(blob)
        for key in names:
            with safe_open(str(where[key]), framework="pt") as f:
                t = f.get_tensor(key).contiguous()
            numbers += t.numel()
            out.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return numbers


_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def checkpoint_identity(path: str | Path, *, verify: bool = True) -> dict:
    """What a checkpoint folder is: its identity.json (checked against the files when ``verify``), or for
    a folder written before identities existed, one derived from its files (source unknown)."""
    path = Path(path)
    if not (path / "structure.json").is_file() or not (path / "model.safetensors").is_file():
        raise UserError(f"{path} is not a compressed checkpoint (needs structure.json and model.safetensors); "
                        f"pass a folder written by `procrustes-onnx compress`")
    derived = {"format": f"procrustes-onnx checkpoint {FORMAT_VERSION}", "kind": "compressed",
               "structure": file_sha256(path / "structure.json"), "weights": file_sha256(path / "model.safetensors")}
    stored = read_identity(path)
    if stored is None:
        return {**derived, "source": None, "id": identity_id({**derived, "source": None})}
    if verify and any(stored.get(k) != v for k, v in derived.items()):
        raise UserError(f"{path} was changed after `procrustes-onnx compress` wrote it (its files no longer match "
                        f"identity.json): re-run compress")
    return stored


def save_compressed(model: nn.Module, out_dir: str | Path, tokenizer=None, extra_config: dict | None = None, *,
                    source: str | None = None, carry: Sequence[str] = ()) -> Path:
    """Write the checkpoint folder atomically (temp folder, then rename); returns `out_dir`.

    `extra_config` keys go into config.json's `procrustes` section next to the surgery record; `source`
    (the dense model's fingerprint) goes into identity.json. `carry`: entries of an existing `out_dir`
    (the tool's own, e.g. a resumable `work/`) moved into the new folder. Other files the tool did not
    write stay; files of an earlier checkpoint are replaced.
    """
    out_dir = Path(out_dir)
    state = surgery_state(model)
    extra = dict(extra_config or {})
    clash = set(extra) & set(state)
    if clash:
        raise UserError(f"extra_config keys {sorted(clash)} collide with the surgery record; rename them")
    tensors, manifest = _collect(model)

    def weights(path: Path) -> None:
        _save_safetensors({k: v.detach().contiguous().clone() for k, v in tensors.items()}, path, metadata=METADATA)

    manifest["stored_parameters"] = sum(int(t.numel()) for t in tensors.values())
    write_checkpoint(model, out_dir, manifest, weights, tokenizer=tokenizer, extra_config=extra, source=source,
                     carry=carry)
    log.info("saved %d tensors (%d numbers) to %s", len(tensors), manifest["stored_parameters"], out_dir)
    return out_dir


METADATA = {"format": "pt", "procrustes_format": str(FORMAT_VERSION)}


def write_checkpoint(model: nn.Module, out_dir: Path, manifest: dict, weights, *, tokenizer=None,
                     extra_config: dict | None = None, source: str | None = None, carry: Sequence[str] = ()) -> None:
    """The folder around the weights, written atomically: config.json with the surgery record, the manifest
    (``manifest`` from `_collect`, with its ``stored_parameters``), tokenizer and identity. ``weights(path)``
    writes model.safetensors; ``model`` only gives config, shapes and module types (a streamed save passes
    its meta-device model)."""
    state = surgery_state(model)
    adapter = get_adapter(model)
    manifest.update(attn_implementation=getattr(model.config, "_attn_implementation", None), tied=adapter.tied,
                    dtype=str(next(model.parameters()).dtype).replace("torch.", ""), dims=position_dims(model),
                    model_type=model.config.model_type,
                    stored_parameters_dense_skips=stored_parameter_count(model, "dense"))
    with atomic_output_dir(out_dir) as tmp:
        config = copy.deepcopy(model.config)
        config.procrustes = {**state, **(extra_config or {})}
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        weights(tmp / "model.safetensors")
        (tmp / "structure.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_identity(tmp, {"format": f"procrustes-onnx checkpoint {FORMAT_VERSION}", "kind": "compressed",
                             "source": source, "structure": file_sha256(tmp / "structure.json"),
                             "weights": file_sha256(tmp / "model.safetensors")})
        for name in carry:
            if (out_dir / name).exists():
                os.replace(out_dir / name, tmp / name)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> nn.Parameter:
    """Put `tensor` at parameter path `name` (any shape: slicing changes them), fixing size attributes."""
    prefix, _, leaf = name.rpartition(".")
    module = get_module(model, prefix)
    param = nn.Parameter(tensor, requires_grad=False)
    setattr(module, leaf, param)
    if isinstance(module, nn.Linear) and leaf == "weight":
        module.out_features, module.in_features = tensor.shape
    elif isinstance(module, nn.Embedding) and leaf == "weight":
        module.num_embeddings, module.embedding_dim = tensor.shape
    return param



def save_compressed_into(model: nn.Module, out_dir: str | Path, tokenizer=None, extra_config: dict | None = None,
                         *, source: str | None = None) -> Path:
    """`save_compressed` into a folder that already holds a resumable `work/`, which is kept."""
    return save_compressed(model, out_dir, tokenizer=tokenizer, extra_config=extra_config, source=source,
                           carry=("work",))


def require_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a compressed checkpoint folder, else a one-line user error (before any slow work)."""
    path = Path(path)
    if not (path / "structure.json").is_file() or not (path / "model.safetensors").is_file():
        raise UserError(f"{path} is not a compressed checkpoint (needs structure.json and model.safetensors); "
                        f"pass a folder written by `procrustes-onnx compress`")
    return path


class _Remaining:
    """A checkpoint's tensors not yet taken, each read from its file when the loader takes it (`ShardReader`:
    one handle per read, so no page stays mapped), never all at once beside the modules built from them."""

    def __init__(self, folder: Path) -> None:
        self._reader = ShardReader(folder)
        self._left = set(self._reader.where)

    def _take(self, *keys: str) -> None:
        for key in keys:
            if key not in self._left:
                raise KeyError(key)
            self._left.remove(key)

    def pop(self, key: str) -> torch.Tensor:
        self._take(key)
        return self._reader.tensor(key)

    def items(self):
        for key in sorted(self._left):
            yield key, self.pop(key)

    def defer_rows(self, key: str, dtype: torch.dtype) -> Callable[[int, int], np.ndarray]:
        """Take ``key`` now; return ``rows(start, stop)``, which reads those rows of it as a numpy array of
        ``dtype``."""
        self._take(key)
        reader = self._reader
        return lambda start, stop: reader.rows(key, start, stop).to(dtype).numpy()

    def keys(self) -> list[str]:
        return sorted(self._left)

    def shape(self, key: str) -> list[int]:
        return self._reader.shape(key)

    def defer(self, keys: dict[str, str]) -> Callable[..., dict[str, torch.Tensor]]:
        """Take ``keys`` (name -> stored key) now and return a loader that reads them (``names``: only those) when
        called (each call reads the file again)."""
        self._take(*keys.values())
        reader = self._reader
        return lambda names=None: {k: reader.tensor(v) for k, v in keys.items() if names is None or k in names}


def _numpy_loader(read: Callable[..., dict[str, torch.Tensor]], dtype: torch.dtype):
    return lambda names=None: {k: v.to(dtype).numpy() for k, v in read(names).items()}


def _shortcut_weight(entry: dict, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """A skip's d_in x d_out weight from its stored tensors (exactly orthogonal ones as their Cayley form)."""
    if entry["storage"] == "cayley":
        return cayley_decode(stored["upper"], stored["signs"])
    return stored["weight"]


def _stand_in_fill(i: int) -> float:
    """The constant of stand-in number i: distinct for every i, so the exporter's deduplication never merges
    two stand-ins (distinct in float32; fp16 would collide past about 1,000)."""
    return (1 + i / 1024) / 4096


def load_compressed(path: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, object]:
    """Rebuild the torch model (StructuredLinears, exact orthogonal skips) and the tokenizer (None if absent)."""
    model, tokenizer, *_ = _load(path, dtype, stand_ins=False)
    return model, tokenizer


@dataclass
class StandIns:
    """What an export needs from a checkpoint without holding its weights: ``model`` with every structured linear,
    skip and table (embedding, untied head, a linear left dense) as a stand-in (a distinct constant of no memory,
    `stand_in_linear`), the ``tokenizer``, and loaders that read each real weight only when the rewrite writes it:
    ``factor_map`` (factors: `ops.lowering.FactorLoader`), ``skips`` (module -> (in x out shape, loader of the in x
    out weight)) and ``tables`` (stand-in constant -> (shape, ``rows(start, stop)`` of the weight as stored)). Only
    norms, biases and square dense weights are loaded."""

    model: nn.Module
    tokenizer: object
    factor_map: dict
    skips: dict
    tables: dict


def load_stand_ins(path: str | Path) -> StandIns:
    """`StandIns` of the checkpoint at ``path``."""
    return StandIns(*_load(path, None, stand_ins=True))


def _is_table(shape: list[int]) -> bool:
    """A weight an export traces as a stand-in and finds again by its value: 2-D (the embedding, an untied head, a
    linear left dense; norms and biases are 1-D), of 4,096 numbers or more, and not square (its transposed copy, if
    the exporter folds one, has another shape)."""
    return len(shape) == 2 and shape[0] != shape[1] and shape[0] * shape[1] >= 1 << 12


def _load(path: str | Path, dtype: torch.dtype | None, stand_ins: bool) -> tuple:
    """(model, tokenizer, factor map, skips, tables): the whole model, or with ``stand_ins`` the `StandIns` parts."""
    path = require_checkpoint(path)
    manifest = json.loads((path / "structure.json").read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {manifest.get('format')}; this build reads {FORMAT_VERSION}")
    config = AutoConfig.from_pretrained(path)
    if manifest.get("attn_implementation"):                     # same attention kernel as when saved
        config._attn_implementation = manifest["attn_implementation"]
    tensors = _Remaining(path)
    dtype = dtype or getattr(torch, manifest["dtype"])
    model = empty_model(config, dtype)  # every weight comes from the file: never build them dense
    state = surgery_state(model)
    if state.get("fused"):
        install_fused_modules(model)
    if manifest["shortcuts"]:
        state["shortcuts"] = False
        with init_empty_weights(include_buffers=False):  # their weights come from the file too
            install_shortcuts(model, manifest["dims"])
    loaded: set[int] = set()
    if manifest.get("embedding"):
        entry = manifest["embedding"]
        a, b = (tensors.pop(entry["tensors"][k]).to(dtype) for k in ("a", "b"))
        emb = install_factored_embedding(model, entry, a, b)
        loaded.update(id(p) for p in emb.parameters())
    factor_map = {}
    for i, (name, entry) in enumerate(manifest["structured"].items()):
        bias = tensors.pop(entry["bias"]).to(dtype) if entry["bias"] else None
        if stand_ins:
            spec = entry["spec"]
            factor_map[name] = {"spec": spec, "bias": bias is not None,
                                "dtype": str(torch.empty(0, dtype=dtype).numpy().dtype),
                                "factors": _numpy_loader(tensors.defer(entry["tensors"]), dtype)}
            module = stand_in_linear(spec["in"], spec["out"], _stand_in_fill(i), dtype, bias)
        else:
            factors = {k: tensors.pop(v).to(dtype) for k, v in entry["tensors"].items()}
            module = StructuredLinear(structured_from_spec(entry["spec"], factors, dtype=dtype), bias)
        set_module(model, name, module)
        loaded.update(id(p) for p in module.parameters())
    skips = {}
    for j, (name, entry) in enumerate(manifest["shortcuts"].items(), start=len(manifest["structured"])):
        keys = dict(zip(("upper", "signs") if entry["storage"] == "cayley" else ("weight",), entry["tensors"]))
        if stand_ins:
            read = tensors.defer(keys)
            skips[name] = (tuple(entry["shape"]), lambda e=entry, r=read: _shortcut_weight(e, r()).to(dtype).numpy())
            w = torch.full((), _stand_in_fill(j), dtype=dtype).expand(*entry["shape"])
        else:
            w = _shortcut_weight(entry, {k: tensors.pop(v) for k, v in keys.items()}).to(dtype)
        loaded.add(id(_assign(model, f"{name}.weight", w)))
    tables = {}
    for k, name in enumerate(tensors.keys(), start=len(manifest["structured"]) + len(manifest["shortcuts"])):
        shape = tensors.shape(name)
        if stand_ins and _is_table(shape):
            tables[_stand_in_fill(k)] = (shape, tensors.defer_rows(name, dtype))
            t = torch.full((), _stand_in_fill(k), dtype=dtype).expand(*shape)
        else:
            t = tensors.pop(name).to(dtype)
        loaded.add(id(_assign(model, name, t)))
    adapter = get_adapter(model)
    if manifest.get("tied") and not (manifest.get("embedding") or {}).get("tied"):
        head = get_module(model, adapter.lm_head_path)
        head.weight = get_module(model, adapter.embed_path).weight
        head.out_features, head.in_features = head.weight.shape
    missing = [n for n, p in model.named_parameters() if id(p) not in loaded]
    if missing:
        raise UserError(f"{path}/model.safetensors lacks {len(missing)} tensors (first: {missing[0]}); "
                        f"the checkpoint is incomplete: re-run compress")
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer, factor_map, skips, tables


def materialize_dense(model: nn.Module) -> dict:
    """Swap every StructuredLinear for an equivalent dense nn.Linear in place; return the factor map the exporter
    needs to rewrite them back: path -> {"spec", "factors" (name -> tensor), "bias" (bool)}. An export that keeps
    no dense twin uses `load_stand_ins` instead (never dense, factors read as they are written)."""
    factor_map = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, StructuredLinear):
            factor_map[name] = {"spec": module.matrix.spec(), "bias": module.bias is not None,
                                "factors": {k: v.detach() for k, v in module.matrix.factors().items()}}
            set_module(model, name, module.to_linear())
    return factor_map


def load_model(spec: str = DEFAULT_MODEL, dtype=None, *, tokenizer: bool = True, allow_compressed: bool = False):
    """Load (model, tokenizer or None) in eval mode, float32 unless told otherwise.

    A compressed checkpoint is loaded with its structured linears (``allow_compressed``) or refused:
    loaded as a dense model its structured linears would be random."""
    model_dir = resolve_model_dir(spec)
    if is_compressed_checkpoint(model_dir):
        if not allow_compressed:
            require_dense(model_dir, spec)
        model, tok = load_compressed(model_dir, dtype=dtype or torch.float32)
        if tokenizer and tok is None:
            tok = load_tokenizer(model_dir)
        return model, (tok if tokenizer else None)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as exc:  # missing or foreign weight files: bad input, not a bug
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{model_dir} cannot be loaded as a causal LM ({first}): pass a folder saved with "
                        "save_pretrained") from None
    return model.eval(), (load_tokenizer(model_dir) if tokenizer else None)
