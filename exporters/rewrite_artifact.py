"""File-level wrapper of the structured rewrite: exported folder + factor map -> new folder, atomically.

Checks at the boundaries only: the input is a readable ONNX file from ``export_onnx`` (it has a
``matmul_map.json``), the output is not the input or inside it, and after the pass the ONNX
checker and shape inference run once before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from procrustes_onnx.core.artifacts import (atomic_output_dir, folder_bytes, load_onnx, model_file,
                                            write_json, write_onnx_identity)
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.outputs import check_output, read_identity

from .genai_config import write_runtime_files
from .onnx_export import MAP_FILE
from .rewrite_structured import RewriteStructuredMatmulsPass, normalize_factor_map, promised_saving

__all__ = ["rewrite_structured_matmuls", "defer_weights", "defer_tables", "factor_map_from_checkpoint", "initializer_bytes"]

logger = logging.getLogger(__name__)


def factor_map_from_checkpoint(checkpoint: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The factor map (structured module -> spec, factors, bias) of a compressed checkpoint folder (via the compressor's own loader)."""
    from procrustes_onnx.compiler.checkpoint import load_compressed, materialize_dense

    model, _ = load_compressed(checkpoint)
    return materialize_dense(model)


def initializer_bytes(model: ir.Model, *, floating_only: bool = False) -> int:
    """Bytes of initializer data (what the external-data file mostly holds); ``floating_only`` leaves out
    the int64 shape constants, so the difference before/after a rewrite is exactly the weights' change."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None and (not floating_only or v.dtype.is_floating_point()))


def defer_weights(model: ir.Model, matmul_map: Mapping[str, Mapping[str, Any]],
                  weights: Mapping[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]) -> None:
    """Give each module of ``weights`` (module -> (in x out shape, loader of its in x out weight)) its real weight
    in place of the stand-in it was traced with, read only when the model is written (``ir.LazyTensor``), in the
    layout of that initializer (the map's ``transposed``: in x out, else out x in)."""
    inits = model.graph.initializers
    for module, (shape, load) in weights.items():
        where = matmul_map.get(module)
        init = inits.get(where["weight"]) if where else None
        if init is None:
            raise UserError(f"{module}: its weight is not an initializer of the exported graph; re-export the model")
        transposed = bool(where["transposed"])
        if tuple(init.shape) != (tuple(shape) if transposed else tuple(shape[::-1])):
            raise UserError(f"{module}: the graph's weight is {list(init.shape)}, the checkpoint's {list(shape)}; "
                            "export the checkpoint's own model")

        def make(load=load, transposed=transposed, name=init.name) -> ir.Tensor:
            w = load()
            return ir.tensor(np.ascontiguousarray(w if transposed else w.T), name=name)
        init.const_value = ir.LazyTensor(make, init.dtype, init.shape, name=init.name)


class _RowBlocks(ir.LazyTensor):
    """A table read from the checkpoint when the model is written, a block of rows at a time (``rows(start,
    stop)``): never whole in memory unless something asks for its values."""

    def __init__(self, rows: Callable[[int, int], np.ndarray], shape: ir.Shape, dtype: ir.DataType, name: str) -> None:
        super().__init__(lambda: ir.tensor(rows(0, shape[0]), name=name), dtype, shape, name=name)
        self.rows = rows

    def tofile(self, file) -> None:
        n = self.shape[0]
        step = max(1, (16 << 20) // max(1, self.nbytes // n))  # about 16 MiB a block
        for start in range(0, n, step):
            file.write(np.ascontiguousarray(self.rows(start, start + step)).tobytes())


def defer_tables(model: ir.Model, tables: Mapping[float, tuple[list[int], Callable[[int, int], np.ndarray]]]) -> None:
    """Give every initializer that holds a table's stand-in constant (the table itself, or a transposed copy the
    exporter folded for a tied head) the real table, read when the model is written (a block of rows at a time,
    or whole for a transposed copy). The constants are distinct, so the value says which table it is. A stand-in
    left unmatched is an error: the file would carry a constant where a weight belongs."""
    shapes: dict[tuple[int, ...], list] = {}
    for fill, (shape, rows) in tables.items():
        shapes.setdefault(tuple(shape), []).append((fill, rows, False))
        shapes.setdefault(tuple(shape[::-1]), []).append((fill, rows, True))
    found = set()
    for init in model.graph.initializers.values():
        candidates = shapes.get(tuple(init.shape or ()))
        if not candidates or init.const_value is None:
            continue
        values = init.const_value.numpy().reshape(-1)
        ends = (values[0], values[-1])  # two pages of the twin's file, not the table
        for fill, rows, transposed in candidates:
            if all(v == values.dtype.type(fill) for v in ends):
                if transposed:
                    def make(rows=rows, n=init.shape[1], name=init.name) -> ir.Tensor:
                        return ir.tensor(np.ascontiguousarray(rows(0, n).T), name=name)
                    init.const_value = ir.LazyTensor(make, init.dtype, init.shape, name=init.name)
                else:
                    init.const_value = _RowBlocks(rows, init.shape, init.dtype, init.name)
                found.add(fill)
    if set(tables) - found:
        raise RuntimeError(f"{len(set(tables) - found)} stand-in table(s) not found in the exported graph; export with "
                           "a kept dense twin (dense_dir) and report this")


def rewrite_structured_matmuls(onnx_in: str | os.PathLike, onnx_out: str | os.PathLike, *,
                               factor_map: Mapping[str, Mapping[str, Any]] | None = None,
                               checkpoint: str | os.PathLike | None = None, overwrite: bool = True,
                               identity: dict | None = None,
                               weights: Mapping[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] | None = None,
                               tables: Mapping[float, tuple[list[int], Callable[[int, int], np.ndarray]]] | None = None,
                               ) -> Path:
    """Rewrite the exported model at ``onnx_in`` (folder or model.onnx) with the structured factors of
    ``factor_map`` (``materialize_dense``'s output) or of the compressed ``checkpoint`` folder; write the
    folder ``onnx_out`` (model.onnx + model.onnx.data + updated matmul_map.json + rewrite.json), with
    ``identity`` (what the result is) as identity.json. ``weights``: other modules traced with stand-ins
    (`load_stand_ins`'s skips), given their real weights as the result is written (`defer_weights`); ``tables``:
    its embedding and untied head, the same way (`defer_tables`)."""
    src = model_file(Path(onnx_in).resolve())
    out = check_output(onnx_out, inputs=[src.parent, checkpoint], overwrite=overwrite)
    if (factor_map is None) == (checkpoint is None):
        raise UserError("rewrite needs exactly one of a factor map or a compressed checkpoint folder")
    map_path = src.parent / MAP_FILE
    if not map_path.is_file():
        raise UserError(f"{src.parent} has no {MAP_FILE}; rewrite only folders written by procrustes-onnx export")
    matmul_map = json.loads(map_path.read_text())
    plan = normalize_factor_map(factor_map if factor_map is not None else factor_map_from_checkpoint(checkpoint))
    model = load_onnx(src)
    defer_weights(model, matmul_map, weights or {})
    defer_tables(model, tables or {})
    before, weights_before = initializer_bytes(model), initializer_bytes(model, floating_only=True)
    result = RewriteStructuredMatmulsPass(matmul_map, plan)(model)
    for p in (common_passes.RemoveUnusedNodesPass(), common_passes.TopologicalSortPass(),
              common_passes.ShapeInferencePass(), common_passes.CheckerPass(full_check=True)):
        p(model)
    after, weights_after = initializer_bytes(model), initializer_bytes(model, floating_only=True)
    new_map = {k: dict(v) for k, v in matmul_map.items()}
    for name, entry in plan.items():
        new_map[name].update(structured=entry["spec"], node=None, weight=None, transpose_node=None)
    if identity is None:  # a structured model of whatever the input was the dense-equivalent export of
        identity = {k: v for k, v in (read_identity(src.parent) or {}).items()
                    if k not in ("id", "kind", "graph", "weights")}
        identity["kind"] = "structured"
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        ir.save(model, tmp / "model.onnx", external_data="model.onnx.data")
        write_onnx_identity(tmp, identity)
        write_runtime_files(tmp, model.graph, src=src.parent)
        write_json(tmp / MAP_FILE, new_map)
        write_json(tmp / "rewrite.json", {
            "source": str(src), "modules": sorted(plan), "modified": result.modified,
            "promised_saving_bytes": promised_saving(plan),
            "initializer_bytes_before": before, "initializer_bytes_after": after,
            "weight_bytes_before": weights_before, "weight_bytes_after": weights_after,
            "file_bytes_before": folder_bytes(src.parent), "file_bytes_after": folder_bytes(tmp),
        })
    logger.info("rewrote %d modules: initializers %d -> %d bytes", len(plan), before, after)
    return out / "model.onnx"
