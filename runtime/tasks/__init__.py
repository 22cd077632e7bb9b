"""procrustes-onnx: runtime/tasks."""
