"""procrustes-onnx: compiler."""
