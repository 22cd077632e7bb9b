"""procrustes-onnx: core (what every layer may import: errors, model and text sources, output folders,
the machine a number was measured on). Imports nothing else of the package."""
