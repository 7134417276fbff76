"""The install: the pinned stack imports together, matches constraints.txt, and the package's own
metadata can never downgrade it."""

from __future__ import annotations

import re

import pytest
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, pin = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = pin.strip()
    return pins


def test_whole_stack_imports_in_one_process_at_the_pinned_versions():
    # torch/torchvision before TensorFlow: the other order segfaults (see convert.tflite._import_tensorflow_safely)
    import torchvision  # noqa: F401
    import ai_edge_litert.interpreter  # noqa: F401
    import fastapi  # noqa: F401
    import litert_torch  # noqa: F401
    import mlflow  # noqa: F401
    import onnx  # noqa: F401
    import onnx2tf  # noqa: F401
    import onnxruntime  # noqa: F401
    import pydantic
    import tensorflow  # noqa: F401
    import torchao  # noqa: F401

    # every installed package is exactly at its pin, including the ones litert-torch forces down
    pins = _constraints()
    wrong = {dist: (version(dist), pin) for dist, pin in pins.items()
             if version(dist).split("+")[0] != pin.split("+")[0]}
    assert not wrong, wrong

    # pydantic 2.11 (forced by litert-torch) still validates MLflow's and FastAPI's models
    class Event(pydantic.BaseModel):
        name: str
        version: int

    assert Event.model_validate({"name": "m", "version": "3"}).version == 3


def test_package_metadata_has_lower_bounds_only():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        assert not re.search(r"(==|<|~=|!=)", dep), f"{dep}: an upper bound or pin could downgrade the stack"
    assert not any(d.startswith("onnx2tf") for d in deps)  # installed with --no-deps by `make setup`


@pytest.mark.slow
def test_the_tflite_exporter_imports_tensorflow_safely_in_a_fresh_process():
    import subprocess
    import sys

    code = ("from skinreg.convert.tflite import _import_tensorflow_safely; _import_tensorflow_safely(); "
            "import onnx2tf, tensorflow, torchvision; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
