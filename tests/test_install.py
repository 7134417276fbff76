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
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    for dep in deps:
        assert not re.search(r"(==|<|~=|!=)", dep), f"{dep}: an upper bound or pin could downgrade the stack"
    assert not any(d.startswith("onnx2tf") for d in deps)  # installed with --no-deps by `make setup`


def _installed_closure(dist: str, extras: set[str]) -> set[str]:
    """Every distribution `pip install 'dist[extras]'` brings, walked through the installed packages' own
    metadata (their Requires-Dist, environment markers and extras evaluated here)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(dist, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        if (canonicalize_name(name), wanted) in seen:
            continue
        seen.add((canonicalize_name(name), wanted))
        try:
            lines = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in lines:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
                todo.append((req.name, frozenset(req.extras)))
    return {name for name, _ in seen}


def test_the_serve_extra_brings_no_torch_tensorflow_converters_or_full_mlflow():
    light = _installed_closure("skinreg", {"serve"})
    assert {"onnxruntime", "fastapi", "uvicorn", "prometheus-client", "mlflow-skinny", "pillow"} <= light, light
    heavy = {"torch", "torchvision", "tensorflow", "tf-keras", "onnx", "litert-torch", "ai-edge-litert", "mlflow",
             "onnxsim", "procrastinate", "matplotlib", "scipy", "pandas"}
    assert not light & heavy, f"`pip install 'skinreg[serve]'` would install {sorted(light & heavy)}"
    assert heavy - {"scipy", "pandas"} <= _installed_closure("skinreg", {"export"})


def test_a_command_whose_extra_is_missing_names_the_extra_in_one_line(tmp_path):
    """`skinreg export` on a light install (torch absent): one line naming the package and the pip command."""
    import subprocess
    import sys

    (tmp_path / "model.pth").write_bytes(b"")
    code = ("import sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "
            "from skinreg.cli.main import main; "
            f"sys.argv = ['skinreg', 'export', '--checkpoint', {str(tmp_path / 'model.pth')!r}]; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1] == ("error: `skinreg export` needs the Python package 'torch', which this install lacks; "
                         "install the extra that brings it: pip install 'skinreg[export]'"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_the_tflite_exporter_imports_tensorflow_safely_in_a_fresh_process():
    import subprocess
    import sys

    code = ("from skinreg.convert.tflite import _import_tensorflow_safely; _import_tensorflow_safely(); "
            "import onnx2tf, tensorflow, torchvision; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_a_light_install_pointed_at_a_database_registry_names_the_fix_in_one_line(tmp_path):
    """`skinreg serve` on MLflow's client alone (no SQLAlchemy: the `serve` install), with the registry left at
    a sqlite:/// store: one line saying to point MLFLOW_TRACKING_URI at a server, before any work."""
    import os
    import subprocess
    import sys

    code = ("import sys; sys.modules['sqlalchemy'] = None; from skinreg.cli.main import main; "
            "sys.argv = ['skinreg', 'serve', '--model', 'models:/m@production', '--port', '9']; main()")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_REGISTRY_URI", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 5 and lines, out.stderr[-2000:]
    assert lines[-1] == (f"error: the registry sqlite:///{tmp_path / 'mlflow.db'} is a database, which MLflow's "
                         "client alone (this install) cannot open; point MLFLOW_TRACKING_URI at an MLflow server "
                         "(http://HOST:5000), or install the full MLflow: pip install 'skinreg[export]'"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "mlflow.db").exists()
