"""procrustes-onnx: compiler/passes."""
