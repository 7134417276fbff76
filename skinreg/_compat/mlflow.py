"""MLflow internals (checked against mlflow 3.17.2), each with the public path it falls back to."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from skinreg._compat import moved
from skinreg.errors import first_line

CHECKED_AGAINST = "3.17.2"
log = logging.getLogger(__name__)


def registry_client(client: Any) -> Any:
    """The registry client behind an MlflowClient: MlflowClient's own methods first ask whether the model is
    a prompt (one request more each). Falls back to the MlflowClient itself."""
    get = getattr(client, "_get_registry_client", None)
    return get() if get is not None else client


def download_file(repo: Any, path: str, root: Path) -> None:
    """Download one artifact known to be a file (listed) to root/path: the public download_artifacts would
    list it again (a request). Falls back to download_artifacts."""
    download = getattr(repo, "_download_file", None)
    if download is None:
        repo.download_artifacts(path, str(root))
        return
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    download(path, str(root / path))


def warm_requirements_map() -> None:
    """Build, once per process, the module -> package map save_model reads to compare a model's pip
    requirements with the environment (seconds in a venv with torch and TensorFlow; variants logged on
    several threads would each build it). Falls back to nothing: only the warm-up is lost."""
    try:
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()
    except Exception as exc:  # noqa: BLE001 - an optimisation only
        log.debug("MLflow requirements map not pre-built: %s", first_line(exc))


def problems() -> list[str]:
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repo import ArtifactRepository
    from mlflow.utils import requirements_utils

    out = []
    for owner, name, fix in ((MlflowClient, "_get_registry_client", "registry_client"),
                             (ArtifactRepository, "_download_file", "download_file"),
                             (requirements_utils, "_init_packages_to_modules_map", "warm_requirements_map")):
        if not hasattr(owner, name):
            out.append(moved("mlflow", CHECKED_AGAINST, f"{getattr(owner, '__name__', owner)}.{name}", fix))
    return out
