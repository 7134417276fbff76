"""Judging files: one runner per runtime (`runtime`), the gates against PyTorch (`validate`), size and latency (`measure`), and whether a .tflite runs under its consumers' delegates (`delegates`)."""
