"""procrustes-onnx: compiler/passes (onnx_ir passes on exported models)."""

from .rewrite_artifact import initializer_bytes, load_onnx, manifest_from_checkpoint, rewrite_structured_matmuls
from .rewrite_structured import RewriteStructuredMatmulsPass, normalize_manifest, promised_saving

__all__ = ["RewriteStructuredMatmulsPass", "rewrite_structured_matmuls", "normalize_manifest", "promised_saving",
           "load_onnx", "manifest_from_checkpoint", "initializer_bytes"]
