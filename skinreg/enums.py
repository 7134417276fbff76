"""Choices shared by the CLI, the MLproject parameters and the code."""

from __future__ import annotations

from enum import Enum


class Format(str, Enum):
    onnx = "onnx"
    tflite = "tflite"
    all = "all"


class Precision(str, Enum):
    float32 = "float32"
    float16 = "float16"
    int8 = "int8"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
