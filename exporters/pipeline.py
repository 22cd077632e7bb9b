"""The library calls behind the CLI verbs ``export``, ``rewrite`` and ``inspect`` (each verb parses its
arguments and calls exactly one of these with keyword arguments)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from procrustes_onnx.core.artifacts import artifact_folder, onnx_identity
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.graph_io import decoder_feeds, empty_past, past_layout
from procrustes_onnx.core.outputs import check_output
from procrustes_onnx.core.sources import resolve_model_dir

from .inspect import inspect_onnx
from .gqa import resolve_attention
from .onnx_export import DEFAULT_ATTENTION, DEFAULT_OPSET, export_onnx
from .rewrite_artifact import rewrite_structured_matmuls
from .weight_swap import swap_weights

__all__ = ["export_model", "export_compressed", "rewrite_model", "inspect_model"]

logger = logging.getLogger(__name__)


def export_model(model: str, out_dir: str | os.PathLike, *, with_past: bool = True, opset: int | None = None,
                 overwrite: bool = True, attention: str = DEFAULT_ATTENTION) -> Path:
    """Export a dense model (alias, HF folder or .gguf; see ``compiler.checkpoint.load_model``) with its tokenizer.

    The output is checked (not an input, writable, empty unless ``overwrite``) before the trace."""
    from procrustes_onnx.compiler.checkpoint import load_model

    check_output(out_dir, inputs=[resolve_model_dir(model)], overwrite=overwrite)
    torch_model, tokenizer = load_model(model)
    return export_onnx(torch_model, out_dir, with_past=with_past, opset=opset or DEFAULT_OPSET, tokenizer=tokenizer,
                       overwrite=overwrite, attention=attention)


def export_compressed(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, with_past: bool = True,
                      opset: int | None = None, dense_dir: str | os.PathLike | None = None,
                      templates: Sequence[str | os.PathLike] = (), dense_equivalent: bool = False,
                      overwrite: bool = True, attention: str = DEFAULT_ATTENTION) -> Path:
    """Compressed checkpoint -> structured ONNX folder: export its dense twin (kept in ``dense_dir`` if
    given, e.g. as the materialized baseline), then rewrite the structured MatMuls. With
    ``dense_equivalent`` the dense twin itself goes to ``out_dir`` (the first half of export + rewrite).
    A twin that is not kept is traced with stand-ins for the structured linears, skips and tables (embedding, an
    untied head; ``load_stand_ins``) and read back from disk by the rewrite, which reads each factor and weight
    from the checkpoint as the result is written: the process holds norms and biases, one tensor at a time of
    the rest, and never a dense copy.

    ``templates``: exported folders that may share this model's architecture (the dense
    model, or another globally rotated model's dense twin); the first whose graph takes every parameter
    is reused with this model's weights instead of tracing again, if ONNX Runtime then agrees with torch;
    otherwise the model is traced as usual; only templates with the same ``attention`` are tried."""
    from procrustes_onnx.compiler.checkpoint import checkpoint_identity, load_compressed, load_stand_ins, materialize_dense

    check_output(out_dir, inputs=[checkpoint, dense_dir], overwrite=overwrite)
    ck = checkpoint_identity(checkpoint)
    origin = {"source": ck.get("source"), "structure": ck.get("structure"), "checkpoint": ck["id"]}
    if dense_equivalent:
        dense_dir = out_dir
    if dense_dir:
        torch_model, tokenizer = load_compressed(checkpoint)
        factor_map, skips, tables = materialize_dense(torch_model), {}, {}
    else:  # a twin nobody keeps only carries the graph: stand-ins, and the weights are read as they are written
        stand = load_stand_ins(checkpoint)
        torch_model, tokenizer, factor_map, skips, tables = (stand.model, stand.tokenizer, stand.factor_map,
                                                             stand.skips, stand.tables)
        del stand
    if not dense_dir:  # the scratch twin lives beside the output, whose parent may not exist yet
        Path(out_dir).resolve().parent.mkdir(parents=True, exist_ok=True)
    scratch = None if dense_dir else Path(tempfile.mkdtemp(prefix=".dense-", dir=Path(out_dir).resolve().parent))
    target = Path(dense_dir) if dense_dir else scratch / "onnx"
    twin = {**origin, "kind": "dense-equivalent"}
    try:
        wanted = resolve_attention(torch_model, attention, with_past)
        same = [f for f in templates if _attention_of(f) == wanted]
        tries = (swap_weights(torch_model, f) for f in (same if with_past else ()))
        swapped = next((t for t in tries if t is not None), None)
        dense = export_onnx(torch_model, target, with_past=with_past, opset=opset or DEFAULT_OPSET,
                            tokenizer=tokenizer, traced=swapped, identity=twin, attention=attention)
        if swapped is not None and not _agrees_with_torch(torch_model, dense):
            logger.warning("a reused graph from %s disagrees with the model: tracing it instead", templates)
            dense = export_onnx(torch_model, target, with_past=with_past, opset=opset or DEFAULT_OPSET,
                                tokenizer=tokenizer, identity=twin, attention=attention)
        if dense_equivalent:
            return dense
        # the twin is on disk: free the weights now. The exporter keeps references to the Parameter objects
        # themselves, so dropping (or moving) the model frees nothing (measured: the embedding stayed alive);
        # emptying each Parameter in place does.
        for param in torch_model.parameters():
            param.data = torch.empty(0, dtype=param.dtype)
        del torch_model, tries, swapped
        return rewrite_structured_matmuls(dense.parent, out_dir, factor_map=factor_map, weights=skips, tables=tables,
                                          overwrite=overwrite,
                                          identity={"format": f"procrustes-onnx onnx {opset or DEFAULT_OPSET}",
                                                    **origin, "kind": "structured", "with_past": with_past})
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _attention_of(folder: str | os.PathLike) -> str:
    """The attention an exported folder's graph has (export.json; folders from before it are unfused)."""
    path = Path(folder) / "export.json"
    try:
        return json.loads(path.read_text()).get("attention", "unfused")
    except (OSError, ValueError):
        return "unfused"


def ort_logits(onnx_path: str | os.PathLike, ids) -> np.ndarray:
    """Logits [B, T, V] of ``ids`` [B, T] (int64) from a fresh ONNX Runtime session, empty past if it has one.

    The exporter's own check; it drives ORT directly (runtime/ builds on exporters/, not back), with the
    feeds of ``core.graph_io`` that the runtime uses too."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    layout, dtype = past_layout(inputs, str(onnx_path))
    feeds, _ = decoder_feeds({i.name for i in inputs}, ids, empty_past(layout, dtype, len(ids)))
    return session.run(["logits"], feeds)[0]


def compare_logits(ref_onnx: str | os.PathLike, onnx_path: str | os.PathLike, ids) -> dict[str, float]:
    """Relative error and top-1 agreement of one ONNX model's logits against another's, on ``ids`` [B, T]."""
    import numpy as np

    ref = ort_logits(ref_onnx, ids).astype(np.float64)
    got = ort_logits(onnx_path, ids).astype(np.float64)
    return {"logits_rel_error": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
            "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}


def _agrees_with_torch(model, onnx_path: Path, tol: float = 1e-4) -> bool:
    """Logits of a short fixed input from ONNX Runtime and torch agree to ``tol`` (relative)."""
    ids = torch.arange(1, 17).remainder(model.config.vocab_size)[None]
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.double().numpy()
    got = ort_logits(onnx_path, ids.numpy()).astype(np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref)) < tol


def rewrite_model(onnx_in: str | os.PathLike, checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                  overwrite: bool = True) -> Path:
    """Rewrite an exported folder with the factors of the compressed checkpoint it was exported from.

    Refused unless the folder's identity says it is the dense-equivalent export of that very checkpoint:
    any other ONNX (a plain dense export, another checkpoint's twin) would give a wrong model."""
    from procrustes_onnx.compiler.checkpoint import checkpoint_identity

    folder = artifact_folder(onnx_in)
    if not folder.is_dir():
        raise UserError(f"--onnx {onnx_in} does not exist: pass the folder `export --dense-equivalent` wrote")
    check_output(out_dir, inputs=[folder, checkpoint], overwrite=overwrite)
    ck = checkpoint_identity(checkpoint)
    have = onnx_identity(folder)
    fix = f"export it with `procrustes-onnx export --checkpoint {checkpoint} --dense-equivalent --out DIR`"
    if have is None:
        raise UserError(f"{folder} has no identity.json, so nothing shows it is the dense-equivalent export of "
                        f"{checkpoint}: {fix}")
    if have.get("kind") != "dense-equivalent":
        raise UserError(f"{folder} is a {have.get('kind')} export, not the dense-equivalent export of {checkpoint} "
                        f"(rewrite needs the checkpoint's own rotated weights): {fix}")
    if have.get("checkpoint") != ck["id"]:
        raise UserError(f"{folder} is the dense-equivalent export of another checkpoint ({have.get('checkpoint')}, "
                        f"not {ck['id']}): {fix}")
    origin = {k: have.get(k) for k in ("format", "source", "structure", "checkpoint", "with_past")}
    return rewrite_structured_matmuls(folder, out_dir, checkpoint=checkpoint, overwrite=overwrite,
                                      identity={**origin, "kind": "structured"})


def inspect_model(path: str | os.PathLike) -> dict[str, Any]:
    """``inspect_onnx`` for the CLI (print ``format_inspection`` of it, or the dict as JSON)."""
    return inspect_onnx(path)
