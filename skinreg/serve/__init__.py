"""`skinreg serve`: the backend's model server for a registered ONNX variant.

- `settings.py`: every setting, with its default (one frozen dataclass, the CLI is derived from it);
- `model.py`: one loaded model version (ONNX Runtime session, its stored preprocessing, image decoding
  within limits) and the batcher that groups requests that arrive together;
- `follower.py`: follows the alias (`models:/<name>-onnx@production`) by polling the registry, and swaps
  in a new version only when its sealed facts vouch for the downloaded files;
- `metrics.py`: the Prometheus metrics;
- `app.py`: the FastAPI app: `POST /predict` (images), the Open Inference Protocol (KServe V2) under
  `/v2`, `/metrics`.

Only onnxruntime, numpy, pillow, MLflow's client, FastAPI/uvicorn and prometheus-client are imported
here (the `serve` extra): never torch, TensorFlow or a converter.
"""

from skinreg.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "run"]


def create_app(settings: ServeSettings):  # -> fastapi.FastAPI
    from skinreg.serve.app import create_app as _create

    return _create(settings)


def run(settings: ServeSettings) -> None:
    """Load the model (refusing to start on one that fails its checks), then serve until stopped."""
    from skinreg.serve.app import run as _run

    _run(settings)
