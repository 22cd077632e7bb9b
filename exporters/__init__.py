"""procrustes-onnx: exporters (HF causal LM -> ONNX folder with KV cache and a recorded MatMul map)."""

from .inspect import format_inspection, inspect_onnx
from .onnx_export import DEFAULT_OPSET, MAP_FILE, export_ir, export_onnx
from .pipeline import export_compressed, export_model, inspect_model, rewrite_model

__all__ = ["DEFAULT_OPSET", "MAP_FILE", "export_ir", "export_onnx", "inspect_onnx", "format_inspection",
           "export_model", "export_compressed", "rewrite_model", "inspect_model"]
