"""Reading source models from, and logging variants to, MLflow tracking (not the registry:
registry.py owns that). Heavy imports stay inside functions."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from skinreg._compat import mlflow as compat_mlflow
from skinreg.enums import Format
from skinreg.errors import RegistryError, first_line
from skinreg.models.architectures import LoadedModel, ModelSpec, build_model, load_checkpoint
from skinreg.data.preprocess import Preprocessing
from skinreg import __version__
from skinreg.export.cache import tool_versions
from skinreg.registry.seal import manifest

if TYPE_CHECKING:
    from skinreg.export.result import ExportResult, VariantResult
    from skinreg.registry.client import VersionRef

log = logging.getLogger(__name__)

SPEC_KEY = "skinreg_spec"  # MLmodel metadata key holding ModelSpec.to_dict()


def _pip(*names: str) -> list[str]:
    """Requirements that install anywhere: exact public versions, no local build tags (+cu..)."""
    return [f"{n}=={version(n).split('+')[0]}" for n in names]


# -- source models -------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceHints:
    """How to read a source version: what fills in for a version registered without skinreg metadata,
    and whether its pickled code may run. Separate from the export settings (what to export)."""

    run_registry_code: bool = False
    arch: str | None = None
    num_classes: int | None = None
    input_size: int | None = None
    labels: list[str] | None = None


@dataclass
class FetchedSource:
    """What `fetch_source` downloaded of a source version (`local`) and the names at the top of its artifact
    (`top`: the loader's safety check reads them too, downloaded or not)."""

    local: Path
    top: set[str]

    def digest(self) -> str:
        """sha256 of everything the loader will read: every downloaded file, and the listed names."""
        from skinreg.data.sources import folder_sha256

        return hashlib.sha256(f"{folder_sha256(self.local)}\0{json.dumps(sorted(self.top))}".encode()).hexdigest()


def fetch_source(ref: "VersionRef", opts: SourceHints, tmp: Path) -> FetchedSource:
    """Download what the loader of `ref` will read into tmp/src (a one-line RegistryError when it cannot)."""
    try:
        local, top = _fetch_source(ref, opts, tmp / "src")
    except Exception as exc:
        raise RegistryError(f"cannot download {ref.uri}: {first_line(exc)}") from None
    return FetchedSource(local, top)


def load_fetched(ref: "VersionRef", fetched: FetchedSource, opts: SourceHints) -> tuple[LoadedModel, bool, list[str]]:
    """Load what `fetch_source` downloaded: (model + spec, dynamic batch?, notes for the report)."""
    from mlflow.models import Model

    local, top = fetched.local, fetched.top
    if (local / "MLmodel").exists():
        mlmodel = Model.load(str(local))
        if "pytorch" in mlmodel.flavors:
            return _load_pytorch_flavor(ref, mlmodel, local, opts, top)
        if not list(local.rglob("*.pth")):
            raise RegistryError(f"{ref.uri} is not a PyTorch model (flavors: {', '.join(mlmodel.flavors)}); "
                                "export needs a version logged with mlflow.pytorch.log_model or a .pth state_dict")
    checkpoints = sorted(local.rglob("*.pth")) + sorted(local.rglob("*.pt"))
    if not checkpoints:
        raise RegistryError(f"{ref.uri} holds neither an MLflow PyTorch model nor a .pth checkpoint; "
                            "register a version logged with mlflow.pytorch.log_model or a state_dict .pth")
    loaded = load_checkpoint(checkpoints[0], arch=opts.arch, num_classes=opts.num_classes,
                             input_size=opts.input_size, labels=opts.labels)
    return loaded, True, [f"source is the checkpoint artifact {checkpoints[0].name} (loaded with weights_only=True)"]


def _fetch_source(ref: "VersionRef", opts: SourceHints, dst: Path) -> tuple[Path, set[str]]:
    """Download what the loader will read, and list what else the version holds (its top-level names).

    For an MLflow PyTorch model read without pickle that is the MLmodel file and the flavor's data folder:
    the input examples and environment files are never read, and against a remote server each file is a
    request or two. Everything is downloaded when MLflow's own loader will run (--run-registry-code: it reads
    the whole folder) and when the version is not an MLflow PyTorch model (a .pth checkpoint is searched
    for anywhere in it)."""
    from mlflow import MlflowClient
    from mlflow.models import Model
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    registry = compat_mlflow.registry_client(MlflowClient())
    repo = get_artifact_repository(registry.get_model_version_download_uri(ref.name, ref.version))
    dst.mkdir(parents=True, exist_ok=True)
    listing = {Path(f.path).name: f for f in repo.list_artifacts()}
    top = set(listing)

    def fetch(path: str) -> None:  # a file known to be one (listed): download_artifacts would list it again
        compat_mlflow.download_file(repo, path, dst)

    if "MLmodel" in listing and not listing["MLmodel"].is_dir and not opts.run_registry_code:
        fetch("MLmodel")
        flavor = Model.load(str(dst)).flavors.get("pytorch")
        if flavor is not None:
            data = str(flavor.get("model_data", "data"))
            if data in listing and listing[data].is_dir:  # a listed name: never a path out of the folder
                for f in repo.list_artifacts(data):
                    if f.is_dir:
                        repo.download_artifacts(f.path, str(dst))
                    else:
                        fetch(f.path)
            return dst, top
    return Path(repo.download_artifacts("", str(dst))), top


def _load_pytorch_flavor(ref: "VersionRef", mlmodel: Any, local: Path, opts: SourceHints, top: set[str]
                         ) -> tuple[LoadedModel, bool, list[str]]:
    """A version logged with mlflow.pytorch.log_model. By default nothing from the registry is executed: the
    pt2 archive's weights are read as data (models/pt2.py) into skinreg's own build of the architecture
    (from the hints, the skinreg spec in the MLmodel, or recognized from the weights' names and shapes).
    With --run-registry-code, MLflow's own loader runs (a pickle, a code folder, a pt2 program)."""
    flavor = mlmodel.flavors["pytorch"]
    data = inside(local, flavor.get("model_data", "data"), what=f"{ref.uri}: the pytorch flavor's model_data")
    risks = code_risks(mlmodel, local, top)
    if risks and not opts.run_registry_code:
        raise RegistryError(f"{ref.uri} would run code from the registry when loaded ({'; '.join(risks)}); pass "
                            "--run-registry-code (MLproject: -P run_registry_code=true) only if you trust its author")
    if not (data / "model.pth").exists() and not (data / "model.pt2").exists():
        raise RegistryError(f"{ref.uri} has neither data/model.pt2 nor data/model.pth; log it with "
                            "mlflow.pytorch.log_model")
    meta = (mlmodel.metadata or {}).get(SPEC_KEY)
    try:
        spec_meta = ModelSpec.from_dict(meta if isinstance(meta, dict) else json.loads(meta)) if meta else None
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"{ref.uri}: its MLmodel's {SPEC_KEY} metadata is malformed ({first_line(exc)}); "
                            "pass --arch, --num-classes, --input-size and --labels instead") from None
    size = opts.input_size or (spec_meta.preprocessing.input_size if spec_meta else None) or _signature_size(mlmodel) or 224
    if opts.run_registry_code:
        return _load_with_mlflow(ref, local, data, opts, spec_meta, size)
    from skinreg.models.architectures import guess_arch, load_state_dict
    from skinreg.models.pt2 import read_state_dict

    state = read_state_dict(data / "model.pt2")
    arch = opts.arch or (spec_meta.arch if spec_meta else None) or guess_arch(state)
    if arch is None:
        from skinreg.models.architectures import ARCHS

        raise RegistryError(f"{ref.uri}: its weights fit none of skinreg's architectures ({', '.join(ARCHS)}), and "
                            "skinreg does not run the pt2 program itself; pass --arch NAME, or --run-registry-code "
                            "(MLproject: -P run_registry_code=true) to run it, only if you trust its author")
    pre = spec_meta.preprocessing if spec_meta else None
    meta = {"labels": list(pre.labels), "mean": list(pre.mean), "std": list(pre.std)} if pre else {}
    loaded = load_state_dict(state, meta=meta, arch=arch, num_classes=opts.num_classes, input_size=size,
                             labels=opts.labels, source=ref.uri)
    return loaded, True, [f"rebuilt {arch} from the weights of the pt2 archive, read as data (its program is "
                          "not run): dynamic batch"]


def _load_with_mlflow(ref: "VersionRef", local: Path, data: Path, opts: SourceHints, spec_meta: ModelSpec | None,
                      size: int) -> tuple[LoadedModel, bool, list[str]]:
    """MLflow's own loader, as the user asked (--run-registry-code): pickle, code/ and pt2 programs run."""
    import mlflow.pytorch
    import torch

    is_pickle = (data / "model.pth").exists()
    model = (mlflow.pytorch.load_model(str(local), map_location="cpu") if is_pickle
             else mlflow.pytorch.load_model(str(local)))
    if not isinstance(model, torch.fx.GraphModule):  # exported graphs refuse .eval(); they are eval already
        model.eval()
    arch = opts.arch or (spec_meta.arch if spec_meta else None)
    with torch.inference_mode():
        try:
            num_classes = int(model(torch.zeros(2, 3, size, size)).shape[-1])
            dynamic = True
        except Exception:
            num_classes = int(model(torch.zeros(1, 3, size, size)).shape[-1])
            dynamic = False
    if opts.num_classes and opts.num_classes != num_classes:
        from skinreg.errors import CheckpointError

        raise CheckpointError(f"class-count mismatch: expected {opts.num_classes} classes (--num-classes) but "
                              f"{ref.uri} outputs {num_classes}; pass --num-classes {num_classes}")
    labels = tuple(opts.labels or (spec_meta.preprocessing.labels if spec_meta else ()) or
                   [f"class_{i}" for i in range(num_classes)])
    base = spec_meta.preprocessing if spec_meta else Preprocessing()
    pre = Preprocessing(input_size=size, mean=base.mean, std=base.std, labels=labels)
    if arch:
        eager = build_model(arch, num_classes)
        missing = eager.load_state_dict(model.state_dict(), strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            from skinreg.errors import CheckpointError

            raise CheckpointError(f"architecture mismatch: the weights of {ref.uri} do not fit {arch} "
                                  f"({len(missing.missing_keys)} missing, {len(missing.unexpected_keys)} unexpected keys); "
                                  "pass the architecture it was trained with")
        return LoadedModel(model=eager.eval(), spec=ModelSpec(arch, num_classes, pre)), True, [
            f"rebuilt eager {arch} from the logged model's state_dict (dynamic batch)"]
    notes = [] if dynamic else [
        "architecture unknown and the logged pt2 model has its batch fixed at 1 (it was logged with a batch-1 "
        "input example): ONNX exported with batch 1; pass --arch to rebuild a dynamic-batch model"]
    return LoadedModel(model=model, spec=ModelSpec(arch or "unknown", num_classes, pre)), dynamic, notes


def code_risks(mlmodel: Any, local: Path, top: set[str] = frozenset()) -> list[str]:
    """What loading this MLflow PyTorch model with MLflow's loader would execute beside the pt2 archive (which
    skinreg reads as data), decided from what MLflow's loader *will* read (mlflow.pytorch._load_model,
    MLflow 3.17), not from which file happens to exist:
    - data/model.pth is unpickled (pickle module named by pickle_module_info.txt, so torch's weights_only
      is off) whenever it exists, even beside a model.pt2;
    - the flavor's `code` folder (and any `code/` in the artifact, downloaded or listed in `top`) is put on
      sys.path and imported from."""
    flavor = mlmodel.flavors["pytorch"]
    data = inside(local, flavor.get("model_data", "data"), what="the pytorch flavor's model_data")
    risks = []
    if (data / "model.pth").exists():
        risks.append(f"{data.name}/model.pth is a pickle, which MLflow loads whenever it exists")
    code = [f["code"] for f in mlmodel.flavors.values() if isinstance(f, dict) and f.get("code")]
    if code or "code" in top or (local / "code").exists():
        risks.append(f"a code folder ({', '.join(map(str, code)) or 'code'}) that MLflow puts on sys.path")
    return risks


def inside(folder: Path, rel: Any, *, what: str) -> Path:
    """`folder / rel` when it stays inside `folder` (no absolute path, no `..`, no link out of it); a one-line
    RegistryError otherwise: a path read from the registry never reaches a file outside what was downloaded."""
    base = Path(folder).resolve()
    target = (base / str(rel)).resolve()
    if not isinstance(rel, str) or Path(rel).is_absolute() or not target.is_relative_to(base):
        raise RegistryError(f"{what} is {str(rel)[:200]!r}, a path outside the model's folder; register the model "
                            "with its files inside its own artifact (mlflow.pytorch.log_model does)")
    return target


def _signature_size(mlmodel: Any) -> int | None:
    try:
        shape = mlmodel.signature.inputs.inputs[0].shape
        return int(shape[-1])
    except Exception:
        return None


def log_source_model(loaded: LoadedModel, *, registered_name: str, example: np.ndarray) -> Any:
    """Log a trained model as an MLflow PyTorch model (pt2) and register it. The example has batch 2
    so torch.export keeps the batch dynamic; the spec goes into the MLmodel metadata."""
    import mlflow

    return mlflow.pytorch.log_model(
        loaded.model, name="model", registered_model_name=registered_name, input_example=example[:2],
        pip_requirements=_pip("torch", "torchvision", "mlflow"),
        metadata={SPEC_KEY: loaded.spec.to_dict()},
    )


# -- variants --------------------------------------------------------------------------------
def _signature(layout: str, size: int, num_classes: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    shape = (-1, 3, size, size) if layout == "NCHW" else (-1, size, size, 3)
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), shape, "image")]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "logits")]))


def variant_metrics(v: "VariantResult") -> dict[str, float]:
    p = v.verdict.parity
    out = {"size_bytes": float(v.size_bytes), "latency_p50_ms": v.latency.p50_ms, "latency_p90_ms": v.latency.p90_ms,
           "parity_max_abs": p.max_abs, "parity_mean_abs": p.mean_abs, "parity_top1_agreement": p.top1_agreement}
    if p.accuracy is not None:
        out.update(accuracy=p.accuracy, accuracy_drop=p.accuracy_drop)
    return out


def log_variant(v: "VariantResult", result: "ExportResult", run: Any) -> tuple[str, str, dict[str, str]]:
    """Log one variant as an MLflow LoggedModel of the active run, with no metrics yet (`log_export_run`
    writes every number once, each variant's linked to its own LoggedModel only).

    Three steps, as `mlflow.<flavor>.log_model` takes them but without its extra reads (MLflow 3.17's
    Model.log also reads the run twice, the LoggedModel once, and links the run output one model at a time):
    create the LoggedModel (one request), save the flavor's folder locally and upload it to the model's
    artifact location (one request per file), mark it READY (one request). The run's outputs are linked
    for all variants at once by `link_variant_outputs`. `run`: the export run (passed, not looked up:
    variants are logged from worker threads, and MLflow's active run is per thread). The file is stored
    byte for byte as validated (ONNX without external data); the consumer check proves it by sha256.
    Returns (models:/m-... URI, id, manifest: the sha256 of every file logged)."""
    import tempfile

    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking.context import registry as context_registry

    spec = result.spec
    pre = spec.preprocessing
    meta = {SPEC_KEY: spec.to_dict(), "skinreg_variant": v.file.variant, "skinreg_gate": v.verdict.status,
            "skinreg_sha256": v.file.sha256}
    client = MlflowClient()
    logged = client.create_logged_model(experiment_id=run.info.experiment_id, name=v.file.variant,
                                        source_run_id=run.info.run_id, tags=context_registry.resolve_tags({}))
    mlmodel = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run.info.run_id,
                    metadata=meta, model_id=logged.model_id)
    # No warnings.catch_warnings() here: variants are logged on several threads at once, and catch_warnings
    # swaps the process-wide filter list (one thread's exit restores a list another thread changed).
    # Known chatter is silenced once by the entry points (quiet.silence_known_warnings).
    with tempfile.TemporaryDirectory(prefix="skinreg-variant-") as tmp:
        local = Path(tmp) / "model"
        if v.file.format is Format.onnx:
            import onnx

            mlflow.onnx.save_model(onnx.load(str(v.file.path)), str(local), mlflow_model=mlmodel,
                                   signature=_signature("NCHW", pre.input_size, spec.num_classes),
                                   onnx_execution_providers=["CPUExecutionProvider"], save_as_external_data=False,
                                   pip_requirements=_pip("onnx", "onnxruntime", "numpy", "mlflow"))
        else:
            # Every artifact file is one upload and one download per consumer: the labels travel inside the
            # preprocessing JSON (`skinreg pull` writes labels.txt from it).
            mlflow.pyfunc.save_model(
                str(local), python_model=str(Path(__file__).with_name("tflite_pyfunc.py")), mlflow_model=mlmodel,
                artifacts={"tflite": str(v.file.path), "preprocessing": str(v.file.sidecar)},
                signature=_signature("NHWC", pre.input_size, spec.num_classes),
                pip_requirements=_pip("ai-edge-litert", "numpy", "mlflow"))
        for pycache in local.rglob("__pycache__"):  # as Model.log: a save may import the model's code
            import shutil

            shutil.rmtree(pycache, ignore_errors=True)
        files = manifest(local)  # what the version will serve, sealed into its lineage
        get_artifact_repository(logged.artifact_location).log_artifacts(str(local))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return f"models:/{logged.model_id}", logged.model_id, files


def link_variant_outputs(model_ids: dict[str, str]) -> None:
    """The variants as the active run's outputs (the run page's "Logged models"): one request for all."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput

    if model_ids:
        MlflowClient().log_outputs(mlflow.active_run().info.run_id,
                                   [LoggedModelOutput(model_id, step=0) for model_id in model_ids.values()])


def export_metrics(result: "ExportResult", model_ids: dict[str, str]) -> list[Any]:
    """Every number of the export once: run-level ones unprefixed (pytorch.*, export_wall_s), each variant's
    as `<variant>.<metric>` linked to that variant's LoggedModel (failed variants: to none)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    run_level = {"pytorch.latency_p50_ms": result.pytorch_latency.p50_ms,
                 "pytorch.latency_p90_ms": result.pytorch_latency.p90_ms, "export_wall_s": result.wall_s}
    if result.pytorch_accuracy is not None:
        run_level["pytorch.accuracy"] = result.pytorch_accuracy
    run_level.update({"stage." + "_".join("".join(c if c.isalnum() else " " for c in k).split()) + "_s": v
                      for k, v in result.stage_seconds.items()})
    metrics = [Metric(k, float(v), now, 0) for k, v in run_level.items()]
    for v in result.variants:
        values = variant_metrics(v)
        check = result.consumer_checks.get(v.file.variant)
        if check is not None:
            values["consumer_check_passed"] = float(check.passed)
            values.update({"consumer_max_abs": max(check.max_abs.values(), default=0.0)})
        model_id = model_ids.get(v.file.variant)
        metrics += [Metric(f"{v.file.variant}.{k}", float(val), now, 0, model_id=model_id) for k, val in values.items()]
    return metrics


def log_export_run(result: "ExportResult", *, run: Any, source: "VersionRef", model_ids: dict[str, str],
                   tags: dict[str, str] | None = None) -> None:
    """Params, metrics and `tags` (one batch), report, plot, and failed files for inspection (uploaded a few
    at a time to the run's artifact location: one request each). `run` (the export run) is passed: this
    may run in a worker thread, and MLflow's active run is per thread."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from skinreg.registry.client import each_at_once, ok

    client, run_id = MlflowClient(), run.info.run_id
    # Prefixed: `mlflow run -e export` already logs its own parameters (arch, input_size, ...) on this
    # run, and MLflow refuses to change a param's value.
    params = {"version.skinreg": __version__, **{f"version.{k}": v for k, v in tool_versions().items()},
              "model.source_uri": source.uri, "model.arch": result.spec.arch,
              "model.input_size": result.spec.preprocessing.input_size,
              "model.num_classes": result.spec.num_classes, "validation.source": result.validation["source"],
              "validation.count": result.validation["count"]}
    client.log_batch(run_id, metrics=export_metrics(result, model_ids),
                     params=[Param(k, str(v)) for k, v in params.items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
    files = [(str(path), "report") for path in (result.report_json, result.report_md, result.plot_png) if path]
    files += [(str(v.file.path), "failed_variants") for v in result.variants if not v.passed]  # never registered
    repo = get_artifact_repository(run.info.artifact_uri)
    for out in each_at_once(lambda f: repo.log_artifact(*f), files):
        ok(out)
