"""onnxscript's ONNX Runtime fusions (``rewriter.ort_fusions.optimize_for_ort``: RMSNorm / SkipRMSNorm,
rotary embedding, attention) on an artifact folder, dense or structured alike; the structured products
are left as they are. The fused graph is checked against the unfused one before it is written, so a
fusion that changes the numbers is never shipped."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import ort_fusions

from procrustes_onnx.core.artifacts import (atomic_output_dir, load_onnx, onnx_identity, source_folder,
                                            write_json, write_onnx_identity)
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.outputs import check_output

from .genai_config import write_runtime_files
from .pipeline import compare_logits

__all__ = ["fuse_artifact", "FUSE_FILE", "FUSED_TOLERANCE"]

logger = logging.getLogger(__name__)

FUSE_FILE = "fuse.json"
FUSED_TOLERANCE = 1e-4  # relative, fp32: the validation tolerance of an unfused export


def fuse_artifact(onnx_in: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """fp32 artifact folder -> the same model with ORT's fused ops, atomically; returns its model.onnx."""
    src = source_folder(onnx_in)
    identity = onnx_identity(src)
    if identity is None:
        raise UserError(f"{src} has no identity.json, so it is not an artifact procrustes-onnx wrote: export it first")
    if identity.get("quantized") or identity.get("fused"):
        raise UserError(f"{src} is already {'quantized' if identity.get('quantized') else 'fused'}: fuse the fp32 "
                        "artifact, then quantize the fused one")
    out = check_output(out_dir, inputs=[src], overwrite=overwrite)
    start = time.perf_counter()
    model = load_onnx(src / "model.onnx")
    model, counts = ort_fusions.optimize_for_ort(model)
    counts = {k: int(v) for k, v in counts.items() if v}
    new_identity = {**{k: v for k, v in identity.items() if k not in ("id", "graph", "weights")},
                    "fused": sorted(counts), "fused_from": identity.get("id")}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        ir.save(model, tmp / "model.onnx", external_data="model.onnx.data")
        del model
        write_onnx_identity(tmp, new_identity)
        write_runtime_files(tmp, ir.load(tmp / "model.onnx").graph, src=src, extra=("rewrite.json",))
        ids = (np.arange(1, 25, dtype=np.int64) * 7919 % 200)[None]
        err = compare_logits(src / "model.onnx", tmp / "model.onnx", ids)["logits_rel_error"]
        if not err < FUSED_TOLERANCE:
            raise UserError(f"the fused graph of {src} disagrees with it (relative error {err:.2e} > "
                            f"{FUSED_TOLERANCE:g}): use the unfused artifact")
        write_json(tmp / FUSE_FILE, {"source": str(src.resolve()), "fusions": counts, "logits_rel_error": err,
                                     "seconds": round(time.perf_counter() - start, 2)})
    logger.info("fused %s -> %s: %s", src, out, counts)
    return out / "model.onnx"
