"""Streamed calibration: a Hugging Face model read from its safetensors shards one module at a time.

The model is built on the meta device (no weights), and `materialise` loads one module (the embedding,
one decoder layer, the final norm) from the shards when the pass reaches it; `release` frees it again.
`stream_grams` carries the calibration hidden states from layer to layer, folds each layer's norms as
`fuse_norms` would (`fuse_layer_norms`), and takes the same Grams as `collect_grams` on the in-memory,
fused model: same modules, same batches, same order of sums, so the same bits. Peak memory is one layer
plus the embedding plus the carried activations, whatever the depth.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Iterator

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from procrustes_onnx.core.errors import UserError

from .adapters import get_adapter, get_module
from .calibration import GramSum, capture_layer_inputs
from .fusion import RMSNorm, fuse_layer_norms

__all__ = ["ShardReader", "empty_model", "materialise", "release", "return_freed_blocks", "stream_grams", "layer_grams", "layer_output"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ShardReader:
    """The tensors of a safetensors folder (one ``model.safetensors`` or shards listed in its index), read
    on demand by module prefix. Every shard is opened once up front, so a missing or corrupt one fails in
    one line before any work (safetensors checks each header against the file's size; it stores no
    checksum, so flipped bytes inside a tensor are not seen)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{index} is not a safetensors index (no weight_map): save the model again "
                                "with save_pretrained") from None
        elif (self.dir / SINGLE).is_file():
            weight_map = None
        else:
            raise UserError(f"{self.dir} has neither {SINGLE} nor {INDEX}: pass a folder saved with "
                            "save_pretrained (safetensors weights)")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self._layout: dict[str, dict[str, tuple[torch.dtype, list[int], int, int]]] = {}
        stored = {name: self._keys(name) for name in files}
        self.where = weight_map or {k: SINGLE for k in stored[SINGLE]}
        for key, name in self.where.items():
            if key not in stored[name]:
                raise UserError(f"{self.dir / name} lacks {key}, which {INDEX} places there: the shard is not "
                                "the one the index was written with; download or save the model again")

    def _open(self, name: str):
        """safe_open of one shard, or a one-line UserError naming it. Each read opens and closes its shard:
        an open handle keeps every page it touched mapped, and so counted in the resident memory."""
        path = self.dir / name
        if not path.is_file():
            raise UserError(f"shard {path} is missing ({INDEX} lists it): download or copy it into {self.dir}")
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise UserError(f"shard {path} is corrupt or truncated ({first}): download or save it again") from None

    def _keys(self, name: str) -> set[str]:
        with self._open(name) as f:
            keys = set(f.keys())
        self._layout[name] = _header_layout(self.dir / name)
        return keys

    def shape(self, key: str) -> list[int]:
        """A stored tensor's shape, from its file's header (nothing read)."""
        return list(self._layout[self.where[key]][key][1])

    def tensor(self, key: str) -> torch.Tensor:
        """One stored tensor by its full name, read from the file into a tensor of its own (the allocator's
        alignment, which BLAS rounds by): no mapped page of the shard and no second copy, so a tensor costs
        its own size only (a mapped read and its copy cost two: 0.25 GiB more for a 32,000 x 2048 embedding)."""
        return self.rows(key, 0, None)

    def rows(self, key: str, start: int, stop: int | None) -> torch.Tensor:
        """Rows ``start:stop`` of a stored tensor (along its first dimension; None: to the end), read the same way:
        a large table written out a block of rows at a time is never whole in memory."""
        name = self.where[key]
        dtype, shape, begin, end = self._layout[name][key]
        count = shape[0] if shape else 1
        stop = count if stop is None else min(stop, count)
        out = torch.empty([stop - start, *shape[1:]] if shape else [], dtype=dtype)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        row = (end - begin) // count if count else 0
        if row * count != end - begin or (out.numel() and len(view) != row * (stop - start)):
            raise UserError(f"shard {self.dir / name} gives {key} {end - begin} bytes for its shape {list(shape)}: "
                            "it is corrupt; download or save it again")
        try:
            with open(self.dir / name, "rb", buffering=0) as fh:
                fh.seek(begin + start * row)
                done = 0
                while done < len(view):
                    n = fh.readinto(view[done:])
                    if not n:
                        raise OSError("it ends early")
                    done += n
        except OSError as exc:
            raise UserError(f"shard {self.dir / name} could not be read ({exc.strerror or exc}): download or copy "
                            "it again") from None
        return out

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every stored tensor under module ``prefix``, keyed by its name inside that module (copies: no
        shard stays mapped)."""
        head = prefix + "."
        return {key[len(head):]: self.tensor(key) for key in self.where if key.startswith(head)}


_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
           "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
           "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
           "F8_E5M2": torch.float8_e5m2}


def _header_layout(path: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """Each tensor's dtype, shape and byte range in a safetensors file (its header: an 8-byte little-endian
    length, then JSON with offsets from the end of the header), which safe_open has already checked."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    base = 8 + size
    return {key: (_DTYPES[e["dtype"]], e["shape"], base + e["data_offsets"][0], base + e["data_offsets"][1])
            for key, e in header.items() if key != "__metadata__"}


def empty_model(source: str | Path | PretrainedConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a folder (or of a config) with every weight on the meta device (buffers such as RoPE's
    inverse frequencies are computed on the CPU as usual), in eval mode, its head tied if the config ties it."""
    config = source if isinstance(source, PretrainedConfig) else AutoConfig.from_pretrained(source)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_config leaves a tied head untied here; from_pretrained ties it
    return model.eval()


def materialise(model: nn.Module, path: str, reader: ShardReader) -> nn.Module:
    """Load module ``path`` of a meta-device model from the shards, in the model's dtype; returns it."""
    module = get_module(model, path)
    dtype = next(module.parameters()).dtype
    module.to_empty(device="cpu")
    stored = reader.tensors(path)
    missing = sorted(set(module.state_dict()) - set(stored))
    if missing:
        raise UserError(f"{reader.dir} stores no {path}.{missing[0]}: the weights do not match the model's "
                        "config.json; download or save the model again")
    module.load_state_dict({k: v.to(dtype) for k, v in stored.items()}, strict=False)
    return module


def release(module: nn.Module) -> None:
    """Free a materialised module's weights (back to the meta device) and hand the freed memory back to
    the system: glibc's heap keeps it otherwise (measured: about one layer more per layer, i.e. the depth)."""
    module.to("meta")
    _trim()


def _libc():
    """glibc, where there is one (None elsewhere: musl, macOS)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def _trim() -> None:
    """glibc's malloc_trim(0), where there is a glibc; elsewhere nothing."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3


def return_freed_blocks(threshold: int = 1 << 20) -> None:
    """Have glibc map every block of ``threshold`` bytes or more on its own, so that freeing it returns it to the
    system at once. glibc otherwise raises this threshold up to 32 MiB as blocks are freed and keeps freed blocks
    below it for reuse, and a solve frees many 8-32 MiB temporaries: on one hidden-2048 position solve the peak
    growth fell from 1.49 to 1.32 GiB for 3% more time (docs/scale.md). Process-wide, as MALLOC_MMAP_THRESHOLD_."""
    libc = _libc()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))


_LIBC = None


def stream_grams(model_dir: str | Path, windows: torch.Tensor, paths: list[str], *, batch_size: int = 4,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`collect_grams` of the norm-fused model of ``model_dir`` for module ``paths`` (as named in the fused
    model: the head's reader is ``lm_head`` or, tied, ``<final norm>.proj``), one decoder layer in memory
    at a time; every Gram is kept until the end (`layer_grams` hands them over layer by layer)."""
    grams: dict[str, torch.Tensor] = {}
    for done in layer_grams(model_dir, windows, paths, batch_size=batch_size, dtype=dtype):
        grams.update(done)
    return {p: grams[p] for p in dict.fromkeys(paths)}


@torch.inference_mode()
def layer_grams(model_dir: str | Path, windows: torch.Tensor, paths: list[str], *, batch_size: int = 4,
                dtype: torch.dtype = torch.float32) -> Iterator[dict[str, torch.Tensor]]:
    """The Grams of `stream_grams`, yielded as soon as they are complete: those of decoder layer i's
    modules after layer i (one dict per layer, maybe empty), then the head's. A caller that drops each
    dict holds one layer's Grams at a time. Llama-family models only: LayerNorm families centre the stream
    first (not streamed yet)."""
    reader = ShardReader(model_dir)
    model = empty_model(model_dir, dtype)
    adapter = get_adapter(model)
    if adapter.centres_stream:
        raise UserError(f"streamed compression does not support {model.config.model_type} yet (its LayerNorms "
                        "need the stream centred first): compress it in memory, without --stream")
    paths = list(dict.fromkeys(paths))
    heads = [p for p in paths if p in (adapter.lm_head_path, f"{adapter.final_norm_path}.proj")]
    layers = tuple(adapter.layer_path(i) + "." for i in range(adapter.num_layers))
    unknown = [p for p in paths if p not in heads and not p.startswith(layers)]
    if unknown:  # a caller's bug (paths come from residual_positions), not bad input
        raise ValueError(f"no streamed Gram for {unknown[:3]}: neither in a decoder layer nor the head's reader")
    acc = GramSum()
    embed = materialise(model, adapter.embed_path, reader)
    batches = capture_layer_inputs(model, windows, batch_size)
    release(embed)
    for i in range(adapter.num_layers):
        layer = materialise(model, adapter.layer_path(i), reader)
        fuse_layer_norms(model, adapter, i)
        inside = [p for p in paths if p.startswith(adapter.layer_path(i) + ".")]
        handles = [get_module(model, p).register_forward_pre_hook(acc.hook(p)) for p in inside]
        try:
            batches = [(layer_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in batches]
        finally:
            for h in handles:
                h.remove()
        release(layer)
        yield acc.grams(inside)
    final = materialise(model, adapter.final_norm_path, reader)
    norm = RMSNorm(adapter.hidden_size, adapter.norm_params(final)[2])
    for p in heads:
        for hidden, _ in batches:
            acc.add(p, norm(hidden))
    yield acc.grams(heads)


def layer_output(out) -> torch.Tensor:
    """A decoder layer's output hidden states (some versions return a tuple)."""
    return out[0] if isinstance(out, tuple) else out
