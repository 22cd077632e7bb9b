"""HF causal LM -> ONNX folder (``model.onnx`` + ``model.onnx.data``, optimum's I/O names, matmul_map.json).

The folder is what optimum's ``ORTModelForCausalLM`` expects (config.json, generation_config.json,
tokenizer files, all readable by transformers 4.x and 5.x), what onnxruntime-genai expects
(genai_config.json), plus ``matmul_map.json`` (module -> MatMul node and weight initializer, recorded
from the exporter's node metadata) that the structured rewrite pass consumes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import torch

from procrustes_onnx.core.artifacts import atomic_output_dir, write_json, write_onnx_identity
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.graph_io import ATTENTION_KEY
from procrustes_onnx.core.sources import model_fingerprint

from .genai_config import write_runtime_files
from .gqa import TRANSLATION, fused_attention, graph_attention, resolve_attention
from .matmul_map import record_matmul_map
from .wrappers import KVCacheWrapper, LogitsWrapper, example_inputs, io_spec

__all__ = ["DEFAULT_ATTENTION", "DEFAULT_OPSET", "MAP_FILE", "export_onnx", "export_ir", "dedupe_transposed_initializers",
           "optimize_exported"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
DEFAULT_ATTENTION = "auto"  # fused GQA where it applies: exact, and 1.5-1.8x decode on SmolLM2 int4 (docs/deploy.md)
MAP_FILE = "matmul_map.json"
_PREFIX = "model."  # attribute name of the wrapped model inside the wrappers


def _matmul_modules(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Modules that become MatMul-by-constant: nn.Linear, plus any leaf with a 2-D ``weight`` (skip matrices)."""
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.Linear):
            out[name] = (mod.in_features, mod.out_features)
        elif isinstance(w, torch.nn.Parameter) and w.ndim == 2 and not isinstance(mod, torch.nn.Embedding) \
                and not list(mod.children()):
            out[name] = tuple(w.shape)  # x @ weight convention for non-Linear matrices
    return out


def dedupe_transposed_initializers(model: ir.Model, min_elements: int = 1024) -> int:
    """Replace a 2-D initializer that equals another one transposed by Transpose(other); returns the count.

    Tied embeddings: the exporter may fold ``lm_head.weight.T`` into its own copy; storing the vocab
    matrix twice would double the largest tensor in the file.
    """
    graph = model.graph
    by_shape: dict[tuple, list[ir.Value]] = {}
    for v in graph.initializers.values():
        if v.const_value is not None and v.shape is not None and len(v.shape) == 2 and v.const_value.size >= min_elements:
            by_shape.setdefault((tuple(v.shape), v.dtype), []).append(v)
    count = 0
    for (shape, dtype), values in list(by_shape.items()):
        partners = by_shape.get((shape[::-1], dtype), [])
        for v in values:
            for src in partners:
                if src is v or v.name not in graph.initializers or src.name not in graph.initializers:
                    continue
                if not np.array_equal(v.const_value.numpy(), src.const_value.numpy().T):
                    continue
                node = ir.node("Transpose", [src], {"perm": [1, 0]}, name=f"/{v.name}/Transpose")
                graph.insert_before(graph.node(0), node)
                node.outputs[0].name = f"{v.name}__from_{src.name}"
                node.outputs[0].shape, node.outputs[0].type = v.shape, v.type
                v.replace_all_uses_with(node.outputs[0])
                graph.initializers.pop(v.name)
                count += 1
                break
    return count


def _cleanup_rules() -> list:
    """The few onnxscript rewrite rules that change a decoder graph: no-op Slices/Expands/Casts and chains."""
    from onnxscript.rewriter.rules import common as rules

    return [rules.collapse_slice_rule, rules.collapse_slice2_rule, rules.no_op_expand_rule, rules.no_op_transpose_rule,
            rules.no_op_cast_rule, rules.cast_cast_rule, rules.reshape_reshape_rule, rules.transpose_transpose_rule,
            rules.unsqueeze_unsqueeze_rule, rules.add_0_rule, rules.sub_0_rule, rules.mul_by_1_rule,
            rules.div_by_1_rule]


def optimize_exported(model: ir.Model) -> None:
    """Inline, fold constants, apply the cleanup rules, lift constants and deduplicate, in place.

    This is onnxscript's ``optimize_ir`` with a small rule set: its default set (what ``torch.onnx.export(
    optimize=True)`` runs) spent over half of a 30-layer export matching rules that never fire on a
    decoder, and the graph it left was the same but for two Reshapes (docs/export.md)."""
    from onnxscript import optimizer, rewriter

    optimizer.inline(model)
    for _ in range(2):  # a rewrite can expose new constants, as in optimize_ir's two rounds
        folded = optimizer.fold_constants_ir(model, onnx_shape_inference=True)
        rewriter.rewrite(model, _cleanup_rules())
        if not folded.modified:
            break
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _trace(model: torch.nn.Module, spec, with_past: bool, opset: int, attention: str):
    """torch.onnx.export of the flat wrapper; ``attention="gqa"`` swaps in the fused attention while tracing."""
    fused = attention == "gqa"
    with fused_attention(model) if fused else contextlib.nullcontext() as rotary:
        wrapper = (KVCacheWrapper(model, rotary) if with_past else LogitsWrapper(model)).eval()
        dtype = next(model.parameters()).dtype
        args = example_inputs(config=model.config, spec=spec, dtype=dtype)
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            return torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, optimize=False,
                                     input_names=spec.input_names, output_names=spec.output_names,
                                     dynamic_shapes=spec.dynamic_shapes, verbose=False,
                                     custom_translation_table=TRANSLATION if fused else None)


class _BroadcastConstant(ir.LazyTensor):
    """The initializer of a stand-in weight (one value broadcast to its shape): written to the file in chunks, never
    materialised whole (the exporter's own tensor makes it contiguous first: 250 MiB for a 32,000 x 2048 table)."""

    def __init__(self, value: np.generic, shape: tuple[int, ...], name: str) -> None:
        super().__init__(lambda: ir.tensor(np.full(shape, value), name=name), ir.DataType.from_numpy(value.dtype),
                         ir.Shape(shape), name=name)
        self.value = value

    def tofile(self, file) -> None:
        left = self.size
        chunk = np.full(min(left, 1 << 20), self.value)
        while left:
            n = min(left, chunk.size)
            file.write(chunk[:n].tobytes())
            left -= n


def _broadcast_stand_ins(model: ir.Model) -> None:
    """Initializers the exporter took from broadcast tensors (stride 0: `load_stand_ins`' stand-ins) become
    `_BroadcastConstant`s: the same bytes in the file, without a dense copy at the save."""
    for v in model.graph.initializers.values():
        raw = getattr(v.const_value, "raw", None)
        if not isinstance(raw, torch.Tensor) or raw.dim() == 0 or raw.numel() < 2 or any(raw.stride()):
            continue
        if raw.dtype not in (torch.float32, torch.float16, torch.float64):
            continue
        value = raw[(0,) * raw.dim()].numpy()[()]
        v.const_value = _BroadcastConstant(value, tuple(raw.shape), v.name)


def export_ir(model: torch.nn.Module, *, with_past: bool = True, opset: int = DEFAULT_OPSET,
              attention: str = DEFAULT_ATTENTION) -> tuple[ir.Model, dict]:
    """Trace ``model`` with the dynamo exporter; returns the onnx_ir model and its matmul map.

    ``attention``: "gqa" emits one GroupQueryAttention node per layer (exporters.gqa), "unfused" the
    exporter's own ops, "auto" gqa where the model allows it; a graph without past is always unfused."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise UserError("export needs a Hugging Face causal LM (a model with .config); load it with load_model")
    if not hasattr(config, "num_attention_heads"):
        raise UserError(f"cannot export {type(model).__name__} ({config.model_type}): it has no attention heads (not a "
                        "transformer decoder), and the exported I/O (attention mask, KV cache) needs them")
    attention = resolve_attention(model, attention, with_past)
    try:
        spec = io_spec(config, with_past)
        program = _trace(model, spec, with_past, opset, attention)
    except Exception as exc:  # an architecture the exporter cannot trace: say which, and why, in one line
        first = (str(exc).strip().splitlines() or [""])[0][:240]
        logger.debug("export of %s failed", type(model).__name__, exc_info=True)
        raise UserError(f"cannot export {type(model).__name__} ({config.model_type}) to ONNX"
                        f"{' with a KV cache' if with_past else ''}: {type(exc).__name__}: {first}; "
                        f"{'try --no-past, or ' if with_past else ''}see docs/export.md for the architectures tested"
                        ) from exc
    onnx_model = program.model
    optimize_exported(onnx_model)
    onnx_model.metadata_props[ATTENTION_KEY] = graph_attention(onnx_model.graph)  # the runtime reads it
    for v in list(onnx_model.graph.initializers.values()):
        if v.name.startswith(_PREFIX) and v.name[len(_PREFIX):] not in onnx_model.graph.initializers:
            v.name = v.name[len(_PREFIX):]
    deduped = dedupe_transposed_initializers(onnx_model)
    _broadcast_stand_ins(onnx_model)
    expected = _matmul_modules(model)
    mapping = record_matmul_map(onnx_model, set(expected), prefix=_PREFIX)
    for name, entry in mapping.items():
        if tuple(entry["shape"]) != tuple(expected[name]):
            raise RuntimeError(f"matmul map: {name} maps to a {entry['shape']} weight, module is {expected[name]}")
    missing = sorted(set(expected) - set(mapping))
    if missing:
        logger.warning("no MatMul found for %d modules: %s", len(missing), ", ".join(missing[:5]))
    logger.info("exported %d MatMuls mapped, %d transposed copies deduplicated", len(mapping), deduped)
    return onnx_model, mapping


def export_onnx(model: torch.nn.Module, out_dir: str | os.PathLike, *, with_past: bool = True,
                opset: int = DEFAULT_OPSET, tokenizer: Any = None, overwrite: bool = True,
                traced: tuple[ir.Model, dict] | None = None, identity: dict | None = None,
                attention: str = DEFAULT_ATTENTION) -> Path:
    """Export ``model`` to ``out_dir/model.onnx`` (+ ``model.onnx.data``), atomically; returns the .onnx path.

    ``traced`` (graph, matmul map) skips tracing, e.g. a template graph carrying this model's weights.
    ``identity`` (what the folder is: kind, source, checkpoint) goes into identity.json; by default a
    dense export of this model. ``attention``: see ``export_ir``; the graph itself says which it got."""
    start = time.perf_counter()
    model = model.eval()
    onnx_model, mapping = traced if traced is not None else export_ir(model, with_past=with_past, opset=opset,
                                                                                   attention=attention)
    if identity is None:
        identity = {"kind": "dense", "source": model_fingerprint(model)}
    identity = {"format": f"procrustes-onnx onnx {opset}", **identity, "with_past": with_past}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        ir.save(onnx_model, tmp / "model.onnx", external_data="model.onnx.data")
        write_onnx_identity(tmp, identity)
        write_json(tmp / MAP_FILE, mapping)
        config = copy.deepcopy(model.config)  # never change the caller's model
        config.use_cache = with_past
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_runtime_files(tmp, onnx_model.graph)
        write_json(tmp / "export.json", {
            "with_past": with_past, "opset": opset, "dtype": str(next(model.parameters()).dtype),
            "attention": graph_attention(onnx_model.graph),
            "inputs": [v.name for v in onnx_model.graph.inputs],
            "outputs": [v.name for v in onnx_model.graph.outputs],
            "seconds": round(time.perf_counter() - start, 2), "traced": traced is None,
            "versions": {"torch": torch.__version__, "onnx_ir": ir.__version__},
        })
    return Path(out_dir).resolve() / "model.onnx"
