"""procrustes-onnx: runtime."""
