"""Weight-only int4/int8 of an exported artifact folder, stacked on its structure, with ONNX Runtime's own
``MatMulNBitsQuantizer`` (MatMul -> MatMulNBits, the token table's Gather -> GatherBlockQuantized).

That quantizer takes 2-D constant weights only, so before it runs:
- GS products, lowered as batched MatMuls on [k, rows, cols] factors, are re-lowered with one 2-D MatMul
  per block (``ops.lowering.lower_gs_blocks``), from the graph's own initializers;
- a tied head, MatMul(x, Transpose(token table)), gets its own transposed initializer (stored twice, once
  per quantized op, and counted in the file size);
- weights too small to gain (K below the block size, or fewer than ``min_elements``) stay fp32, each listed
  with its reason in quantize.json.
Kronecker factors are already 2-D MatMuls and need nothing.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from procrustes_onnx.core.artifacts import (atomic_output_dir, folder_bytes, load_onnx, onnx_identity,
                                            source_folder, write_json, write_onnx_identity)
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.outputs import check_output
from procrustes_onnx.ops.lowering import lower_gs_blocks

from .genai_config import write_runtime_files
from .pack import pack_sibling_matmuls
from .pipeline import compare_logits

__all__ = ["QuantizeConfig", "quantize_artifact", "relower_gs_blocks", "untie_matmul_weights", "QUANT_FILE",
           "PRECISIONS"]

logger = logging.getLogger(__name__)

QUANT_FILE = "quantize.json"
PRECISIONS = ("none", "int8", "int4")
ALGORITHMS = ("rtn", "hqq")


@dataclass(frozen=True)
class QuantizeConfig:
    """What ``quantize_artifact`` does. ``bits`` 4 or 8; ``head_bits`` None means the same as ``bits``.

    ``accuracy_level`` 4 lets MatMulNBits compute in int8 on CPU (what onnxruntime-genai's builder uses
    for CPU int4); 0 computes in the activations' float type. The token table gets ``bits`` too (ORT's
    quantizer writes 4-bit Gathers only; the 8-bit one is written here)."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    algorithm: str = "rtn"
    head_bits: int | None = None
    embedding: bool = True
    accuracy_level: int = 4
    min_elements: int = 4096
    keep: str | None = None  # a regular expression: constant-weight nodes whose name matches it stay float
    share_table: bool = True  # a tied head and the token table keep one copy of their quantized blocks
    pack: bool = True  # sibling MatMuls (q/k/v, gate/up) quantized as one (exporters/pack.py)

    def validate(self) -> "QuantizeConfig":
        if self.bits not in (4, 8):
            raise UserError(f"quantize bits {self.bits} is not supported: use int4 or int8")
        if self.head_bits not in (None, 4, 8):
            raise UserError(f"--quantize-head int{self.head_bits} is not supported: use int4, int8 or same")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UserError(f"--quantize-block {self.block_size} must be a power of two, at least 16 (32 is usual)")
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"--quantize-algorithm {self.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        if self.algorithm == "hqq" and self.symmetric:
            raise UserError("HQQ quantizes asymmetrically: add --quantize-asymmetric, or use --quantize-algorithm rtn")
        if self.keep is not None:
            try:
                re.compile(self.keep)
            except re.error as exc:
                raise UserError(f"--quantize-keep {self.keep!r} is not a regular expression ({exc})") from None
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UserError(f"--quantize-accuracy {self.accuracy_level} must be 0 to 4 (MatMulNBits accuracy_level)")
        return self

    @property
    def name(self) -> str:
        return f"int{self.bits}"


def relower_gs_blocks(model: ir.Model) -> list[str]:
    """Re-lower every batched GS product (initializers ``<module>/gs_left``, ``<module>/gs_right``) with
    2-D MatMuls per block, in place; returns the modules re-lowered."""
    graph = model.graph
    done = []
    for name in [n for n in graph.initializers if n.endswith("/gs_left")]:
        module = name[: -len("/gs_left")]
        left, right = graph.initializers[name], graph.initializers.get(f"{module}/gs_right")
        nodes = [n for n in graph if (n.name or "").startswith(f"{module}/")]
        if right is None or not nodes:
            raise UserError(f"{module}: a GS factor or its nodes are missing from the graph; re-export the artifact")
        inside = {v for n in nodes for v in n.outputs}
        x = nodes[0].inputs[0]
        y_old = nodes[-1].outputs[0]
        leaks = [v for v in inside - {y_old} if any(u.node not in nodes for u in v.uses()) or v.is_graph_output()]
        if x in inside or leaks:
            raise UserError(f"{module}: the GS subgraph is not the exporter's (values used outside it); re-export")
        new_nodes, inits, y = lower_gs_blocks(x, left.const_value.numpy(), right.const_value.numpy(),
                                              f"{module}/blocks")
        for v in inits:
            graph.register_initializer(v)
        ir.convenience.replace_nodes_and_values(graph, insertion_point=nodes[0], old_nodes=nodes, new_nodes=new_nodes,
                                                old_values=[y_old], new_values=[y])
        done.append(module)
    common_passes.RemoveUnusedNodesPass()(model)  # the batched factors, now read by nothing
    return done


def untie_matmul_weights(model: ir.Model) -> list[str]:
    """MatMul(x, Transpose(W)), or ORT's FusedMatMul(x, W, transB=1) from the fusions, with a constant W ->
    MatMul(x, W^T as its own initializer), in place; returns the nodes changed (the tied head, whose table
    the Gather keeps reading)."""
    graph = model.graph
    changed = []
    for node in list(graph):
        src = None
        if node.op_type == "MatMul":
            producer = node.inputs[1].producer() if node.inputs[1] is not None else None
            if producer is not None and producer.op_type == "Transpose":
                src = producer.inputs[0]
        elif node.op_type == "FusedMatMul" and node.domain == "com.microsoft":
            attrs = {k: a.value for k, a in node.attributes.items()}
            if attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0 \
                    and not attrs.get("transBatchA") and not attrs.get("transBatchB"):
                src = node.inputs[1]
        if src is None or src.const_value is None or src.shape is None or len(src.shape) != 2:
            continue
        arr = np.ascontiguousarray(src.const_value.numpy().T)
        name = f"{src.name}.transposed"
        value = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(src.dtype),
                         const_value=ir.tensor(arr, name=name))
        graph.register_initializer(value)
        if node.op_type == "MatMul":
            node.replace_input_with(1, value)
        else:
            matmul = ir.node("MatMul", [node.inputs[0], value], name=node.name)
            matmul.outputs[0].type, matmul.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
            ir.convenience.replace_nodes_and_values(graph, insertion_point=node, old_nodes=[node], new_nodes=[matmul],
                                                    old_values=[node.outputs[0]], new_values=[matmul.outputs[0]])
        changed.append(node.name)
    common_passes.RemoveUnusedNodesPass()(model)
    return changed


def _size_reason(dims: list[int], config: QuantizeConfig) -> str | None:
    """Why a MatMul weight of shape ``dims`` stays float whatever its name, or None (the rule ``_plan`` applies)."""
    if len(dims) != 2:
        return f"{len(dims)}-D weight (MatMulNBits takes 2-D)"
    if dims[0] < config.block_size:
        return f"K={dims[0]} is below the block size {config.block_size}: padding would cost more than it saves"
    if dims[0] * dims[1] < config.min_elements:
        return f"{dims[0] * dims[1]} weights, fewer than {config.min_elements}: nothing to gain"
    return None


def _quantized_alone(node: ir.Node, config: QuantizeConfig) -> bool:
    """Whether ``_plan`` would quantize this constant-weight MatMul on its own: only such MatMuls are packed, so
    packing never changes which weights are rounded (quantization-aware healing mirrors the unpacked rule)."""
    head = any(v.name == "logits" for v in node.outputs)  # it may take other bits (--quantize-head)
    kept = config.keep and re.search(config.keep, node.name or "")
    return not head and not kept and _size_reason([int(d) for d in node.inputs[1].shape], config) is None


def _plan(proto, config: QuantizeConfig) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    """Node names per (bits) group to quantize, and the constant-weight MatMuls/Gathers kept in float."""
    inits = {t.name: t for t in proto.graph.initializer}
    groups: dict[str, list[str]] = {"matmul": [], "head": [], "gather": []}
    kept = []
    head = _head_node(proto)
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gather"):
            continue
        weight = node.input[1] if node.op_type == "MatMul" else node.input[0]
        if weight not in inits:
            continue
        dims = list(inits[weight].dims)
        if config.keep and re.search(config.keep, node.name):
            kept.append({"node": node.name, "weight": weight, "shape": dims, "why": f"matches --quantize-keep {config.keep}"})
            continue
        if node.op_type == "Gather":
            if not config.embedding:
                kept.append({"node": node.name, "weight": weight, "shape": dims, "why": "token table kept (--no-quantize-embedding)"})
            elif len(dims) == 2 and dims[0] * dims[1] >= config.min_elements:
                groups["gather"].append(node.name)
            continue
        why = _size_reason(dims, config)
        if why:
            kept.append({"node": node.name, "weight": weight, "shape": dims, "why": why})
        else:
            groups["head" if node.name == head else "matmul"].append(node.name)
    return groups, kept


def _head_node(proto) -> str | None:
    """The MatMul producing the logits (the graph output named ``logits``), if it is one directly."""
    for node in proto.graph.node:
        if "logits" in node.output and node.op_type == "MatMul":
            return node.name
    return None


def _quantizer_module():
    """ORT's quantizer module, without the side effect of its import: ``logging.basicConfig(level=INFO)``
    on the root logger, which would print a line per node to our users. Its opset-21 warning is silenced
    too: the result is loaded and checked against the fp32 logits before it is written."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer as module

    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger(module.__name__).setLevel(logging.ERROR)
    return module


def _run_quantizer(proto, names: list[str], bits: int, config: QuantizeConfig):
    """ORT's quantizer restricted to ``names`` (everything else is excluded)."""
    q = _quantizer_module()
    DefaultWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig = q.DefaultWeightOnlyQuantConfig, q.HQQWeightOnlyQuantConfig
    MatMulNBitsQuantizer = q.MatMulNBitsQuantizer

    if not names:
        return proto
    ops = tuple(sorted({n.op_type for n in proto.graph.node if n.name in names}))
    if config.algorithm == "hqq" and ops == ("MatMul",):
        algo = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=bits, op_types_to_quantize=ops)
    else:
        algo = DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=config.symmetric, bits=bits,
                                            accuracy_level=config.accuracy_level or None, op_types_to_quantize=ops,
                                            quant_axes=(("MatMul", 0), ("Gather", 1)))
    wanted = set(names)
    exclude = [n.name for n in proto.graph.node if n.op_type in ops and n.name not in wanted]
    quantizer = MatMulNBitsQuantizer(proto, algo_config=algo, nodes_to_exclude=exclude)
    quantizer.process()
    return quantizer.model.model


_CHECK_TEXT = ("Before you change a program, read it once from the top: what each function returns, which files it "
               "writes, and what happens when the disk is full.")


def _check_ids(folder: Path, vocab: int) -> np.ndarray:
    """A fixed English sentence in the folder's own tokenizer (fixed ids where it has none), [1, T]."""
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(folder))(_CHECK_TEXT)["input_ids"]
    except Exception:  # a folder without tokenizer files: still a check, on arbitrary ids
        ids = []
    ids = [i for i in ids if i < vocab] or list(np.arange(1, 33) * 7919 % max(vocab, 2))
    return np.asarray(ids, dtype=np.int64)[None]


def _quantize_gathers_8bit(proto, names: list[str], config: QuantizeConfig, skipped: list[dict]):
    """Token-table Gathers -> 8-bit GatherBlockQuantized (ONNX Runtime runs bits=8, but its quantizer only
    writes 4): per block of ``block_size`` along the hidden axis, symmetric about the zero point 128."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    wanted = set(names)
    for i, node in enumerate(proto.graph.node):
        if node.name not in wanted:
            continue
        table = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        rows, cols = table.shape
        if cols % config.block_size:
            skipped.append({"node": node.name, "weight": node.input[0], "shape": [rows, cols],
                            "why": f"width {cols} is not a multiple of the block size {config.block_size} (8-bit table)"})
            continue
        blocks = table.reshape(rows, cols // config.block_size, config.block_size)
        scale = np.maximum(np.abs(blocks).max(-1), 1e-12) / 127.0
        q = (np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128).astype(np.uint8).reshape(rows, cols)
        base = node.input[0]
        proto.graph.initializer.extend([numpy_helper.from_array(q, f"{base}_Q8"),
                                        numpy_helper.from_array(scale.astype(table.dtype), f"{base}_scales"),
                                        numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), f"{base}_zp")])
        new = helper.make_node("GatherBlockQuantized", [f"{base}_Q8", node.input[1], f"{base}_scales", f"{base}_zp"],
                               list(node.output), name=f"{node.name}_Q8", domain="com.microsoft", bits=8,
                               block_size=config.block_size, gather_axis=0, quantize_axis=1)
        proto.graph.node.remove(node)
        proto.graph.node.insert(i, new)
        if not any(base in n.input for n in proto.graph.node):
            proto.graph.initializer.remove(inits[base])
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return proto


def _dequantized_blocks(data: np.ndarray, scales: np.ndarray, zero: np.ndarray | float, bits: int,
                        block: int) -> np.ndarray:
    """[rows, cols] float values of blocks quantized along the columns (uint8 packs two int4, low first)."""
    if bits == 4 and data.dtype == np.uint8:
        data = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(data.shape[0], -1)
    values = data.astype(np.float32) - np.repeat(np.broadcast_to(zero, scales.shape), block, axis=1)[:, :data.shape[1]]
    return values * np.repeat(scales.astype(np.float32), block, axis=1)[:, :data.shape[1]]


def _share_token_table(proto, tied: bool) -> bool:
    """A tied head and its token table, both quantized: keep one copy of the quantized blocks, the head's.

    The Gather then reads the head's packed uint8 blocks, and the head's MatMulNBits reads them through a
    Reshape that ONNX Runtime folds at load. ORT's Gather and MatMul quantizers may round a few values
    differently, so the two are shared only if every value agrees within one step. Returns True if shared;
    nothing changes otherwise."""
    from onnx import helper, numpy_helper

    if not tied:
        return False
    inits = {t.name: t for t in proto.graph.initializer}
    gathers = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized" and n.input[0] in inits]
    heads = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and "logits" in n.output and n.input[1] in inits]
    if len(gathers) != 1 or len(heads) != 1:
        return False
    gather, head = gathers[0], heads[0]
    g_attr = {a.name: helper.get_attribute_value(a) for a in gather.attribute}
    h_attr = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    bits, block = g_attr.get("bits", 4), g_attr.get("block_size")
    if (g_attr.get("gather_axis", 0), g_attr.get("quantize_axis", 1)) != (0, 1) or bits != h_attr.get("bits") \
            or block != h_attr.get("block_size") or len(head.input) > 3:
        return False
    table, blocks = numpy_helper.to_array(inits[gather.input[0]]), numpy_helper.to_array(inits[head.input[1]])
    g_scales, h_scales = numpy_helper.to_array(inits[gather.input[2]]), numpy_helper.to_array(inits[head.input[2]])
    rows = blocks.shape[0]
    h_scales = h_scales.reshape(g_scales.shape)
    offset = 8 if bits == 4 else 128
    g_zero = numpy_helper.to_array(inits[gather.input[3]]) if len(gather.input) > 3 else (offset if table.dtype == np.uint8 else 0)
    cols = table.shape[1] * (2 if bits == 4 and table.dtype == np.uint8 else 1)
    if blocks.shape[1] * block != cols:  # padded blocks: the Gather would return the padding too
        return False
    theirs = _dequantized_blocks(blocks.reshape(rows, -1), h_scales, offset, bits, block)
    mine = _dequantized_blocks(table, g_scales, g_zero, bits, block)
    step = np.repeat(np.maximum(np.abs(g_scales), np.abs(h_scales)), block, axis=1)
    if theirs.shape != mine.shape or not np.all(np.abs(theirs - mine) <= 1.01 * step):
        return False
    name = f"{gather.input[0]}.shared"
    proto.graph.initializer.extend([numpy_helper.from_array(blocks.reshape(rows, -1), name),
                                    numpy_helper.from_array(np.array(blocks.shape, np.int64), f"{name}.head_shape")])
    proto.graph.node.insert(0, helper.make_node("Reshape", [name, f"{name}.head_shape"], [f"{name}.head"],
                                                name=f"{name}/Reshape"))
    for old in {gather.input[0], head.input[1], gather.input[2], *gather.input[3:]} - {head.input[2]}:
        proto.graph.initializer.remove(inits[old])
    indices = gather.input[1]
    del gather.input[:]
    gather.input.extend([name, indices, head.input[2]])
    if bits == 8:  # uint8 about 128, as the head's symmetric blocks (4-bit uint8 defaults to 8 itself)
        proto.graph.initializer.append(numpy_helper.from_array(np.full(g_scales.shape, 128, np.uint8), f"{name}.zero"))
        gather.input.append(f"{name}.zero")
    head.input[1] = f"{name}.head"
    return True


def _logits_check(fp32: Path, quantized: Path, vocab: int) -> dict[str, float]:
    """Relative error and top-1 agreement of the quantized logits against the fp32 artifact's."""
    ids = _check_ids(fp32.parent, vocab)
    return {**compare_logits(fp32, quantized, ids), "check_tokens": int(ids.shape[1])}


def quantize_artifact(onnx_in: str | os.PathLike, out_dir: str | os.PathLike, config: QuantizeConfig = QuantizeConfig(),
                      *, overwrite: bool = True) -> Path:
    """fp32 artifact folder (dense or structured, from ``export``/``rewrite``) -> a weight-only quantized
    folder beside it, atomically; returns its model.onnx. The input is never changed."""
    import onnx
    import onnxruntime

    config.validate()
    src = source_folder(onnx_in)
    identity = onnx_identity(src)
    if identity is None:
        raise UserError(f"{src} has no identity.json, so it is not an artifact procrustes-onnx wrote: export it with "
                        "`procrustes-onnx export`, then quantize that folder")
    if identity.get("quantized"):
        raise UserError(f"{src} is already {identity['quantized']}: quantize the fp32 artifact it came from")
    out = check_output(out_dir, inputs=[src], overwrite=overwrite)
    start = time.perf_counter()
    model = load_onnx(src / "model.onnx")
    gs_modules = relower_gs_blocks(model)
    tables = {n.inputs[0].name for n in model.graph if n.op_type == "Gather" and n.inputs[0].const_value is not None}
    untied = untie_matmul_weights(model)
    tied = any(v.name.removesuffix(".transposed") in tables for n in model.graph if n.name in untied
               for v in n.inputs[1:2])
    packs = pack_sibling_matmuls(model, lambda n: _quantized_alone(n, config)) if config.pack else []
    for p in (common_passes.RemoveUnusedNodesPass(), common_passes.TopologicalSortPass()):
        p(model)
    proto = ir.to_proto(ir.external_data.load_to_model(model))  # ORT's quantizer reads weights from the proto
    del model
    groups, kept = _plan(proto, config)
    head_bits = config.head_bits or config.bits
    proto = _run_quantizer(proto, groups["matmul"], config.bits, config)
    proto = _run_quantizer(proto, groups["head"], head_bits, config)
    if config.bits == 8:
        proto = _quantize_gathers_8bit(proto, groups["gather"], config, kept)
    else:
        proto = _run_quantizer(proto, groups["gather"], 4, config)
    shared = config.share_table and _share_token_table(proto, tied)
    ops = {}
    for node in proto.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    label = config.name if head_bits == config.bits else f"{config.name} (head int{head_bits})"
    new_identity = {**{k: v for k, v in identity.items() if k not in ("id", "graph", "weights")}, "quantized": label,
                    "quantized_from": identity.get("id")}
    vocab = next((int(t.dims[0]) for t in proto.graph.initializer
                  if any(n.op_type in ("Gather", "GatherBlockQuantized") and n.input[0] == t.name
                         for n in proto.graph.node)), 256)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        onnx.save(proto, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=1024)
        del proto
        write_onnx_identity(tmp, new_identity)
        write_runtime_files(tmp, ir.load(tmp / "model.onnx").graph, src=src, extra=("rewrite.json",))
        check = _logits_check(src / "model.onnx", tmp / "model.onnx", vocab)
        write_json(tmp / QUANT_FILE, {
            "config": asdict(config), "label": label, "source": str(src.resolve()), "quantized_ops": ops,
            "kept_float": kept, "gs_relowered_in_blocks": len(gs_modules), "untied_heads": untied, "packed": packs,
            "groups": {k: len(v) for k, v in groups.items()}, "token_table_shared_with_head": shared, "embedding_bits": config.bits if groups["gather"] else None,
            "bytes_before": folder_bytes(src), "bytes_after": folder_bytes(tmp), **check,
            "seconds": round(time.perf_counter() - start, 2), "onnxruntime": onnxruntime.__version__,
        })
    logger.info("quantized %s -> %s (%s): %s", src, out, label, ops)
    return out / "model.onnx"
