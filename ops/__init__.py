"""procrustes-onnx: ops."""
