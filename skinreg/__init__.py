"""skinreg: registry-driven export of PyTorch image classifiers to ONNX and TFLite."""

__version__ = "0.1.0"
