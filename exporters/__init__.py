"""procrustes-onnx: exporters (HF causal LM -> ONNX folder with KV cache and a recorded MatMul map, and the
structured rewrite of that folder's mapped MatMuls)."""

from .inspect import format_inspection, inspect_onnx
from .onnx_export import DEFAULT_OPSET, MAP_FILE, export_ir, export_onnx
from .pipeline import export_compressed, export_model, inspect_model, rewrite_model
from .rewrite_artifact import initializer_bytes, factor_map_from_checkpoint, rewrite_structured_matmuls
from .rewrite_structured import RewriteStructuredMatmulsPass, normalize_factor_map, promised_saving

__all__ = ["DEFAULT_OPSET", "MAP_FILE", "export_ir", "export_onnx", "inspect_onnx", "format_inspection",
           "export_model", "export_compressed", "rewrite_model", "inspect_model",
           "RewriteStructuredMatmulsPass", "rewrite_structured_matmuls", "normalize_factor_map", "promised_saving",
           "factor_map_from_checkpoint", "initializer_bytes"]
