"""procrustes-onnx: ProcrustesGPT compression of causal LMs, exported as structured ONNX models."""

__version__ = "0.1.0"
