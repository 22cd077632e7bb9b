"""procrustes-onnx: exporters (HF causal LM -> ONNX folder with KV cache and a recorded MatMul map)."""

from .onnx_export import DEFAULT_OPSET, MAP_FILE, export_ir, export_onnx

__all__ = ["DEFAULT_OPSET", "MAP_FILE", "export_ir", "export_onnx"]
