"""procrustes-onnx: compiler/adapters."""
