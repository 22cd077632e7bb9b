"""procrustes-onnx: exporters."""
