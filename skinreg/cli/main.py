"""The `skinreg` command line. Errors become one line on stderr and an exit code here, and only here."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from skinreg.enums import Device
from skinreg.errors import SkinregError
from skinreg.quiet import filtered_stderr, silence_known_warnings
from skinreg.export.settings import ExportSettings, export_settings_options

# Process settings belong to the entry point, never to library code (a service runs many jobs in one process).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # litert-torch's progress tree; skinreg reports its own

app = typer.Typer(help="Export PyTorch image classifiers to validated ONNX and TFLite, driven by the MLflow registry.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@app.callback()
def _options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help=(
        "Show everything: debug logs, MLflow's download bars, TensorFlow/converter output, warnings "
        "(otherwise they go to a log file named at the end)."))] = False) -> None:
    if verbose:
        os.environ["SKINREG_VERBOSE"] = "1"


def command(name: str | None = None, *, typer_app: typer.Typer | None = None, **kw):
    """app.command (or typer_app.command), with SkinregError turned into one stderr line and the
    error's exit code. Every skinreg command, registry_hooks' included, is declared through this."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _setup_logging()
            # one-shot commands: converter/MLflow chatter to a log file (skinreg.quiet); the hooks' long-lived
            # processes (typer_app) keep their stderr as it is
            quiet = filtered_stderr() if typer_app is None else contextlib.nullcontext()
            try:
                with quiet:
                    return fn(*args, **kwargs)
            except SkinregError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(exc.exit_code) from None
            except ModuleNotFoundError as exc:
                typer.echo(f"error: {missing_extra(name or fn.__name__, exc)}", err=True)
                raise typer.Exit(2) from None
            except Exception as exc:
                if not type(exc).__module__.startswith("mlflow"):
                    raise
                from skinreg.registry.client import unreachable, unreachable_error

                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                first = str(unreachable_error(name or fn.__name__)) if unreachable(exc) else f"MLflow: {first}"
                typer.echo(f"error: {first}", err=True)
                raise typer.Exit(5) from None

        return (typer_app or app).command(name, **kw)(wrapper)

    return deco


SERVE_MODULES = {"onnxruntime", "fastapi", "uvicorn", "multipart", "python_multipart", "prometheus_client", "starlette"}


def missing_extra(command_name: str, exc: ModuleNotFoundError) -> str:
    """One line for a command run on an install that lacks the extra it needs (`pip install skinreg` is the
    CLI and MLflow's client only; `[serve]` adds the server, `[export]` the converters and full MLflow)."""
    module = (exc.name or str(exc)).split(".")[0]
    extra = "serve" if module in SERVE_MODULES else "export"
    return (f"`skinreg {command_name.replace('_', '-')}` needs the Python package '{module}', which this install "
            f"lacks; install the extra that brings it: pip install 'skinreg[{extra}]'")


def _setup_logging() -> None:
    from skinreg.quiet import verbose

    level = logging.DEBUG if os.environ.get("SKINREG_DEBUG") or verbose() else logging.INFO
    if not verbose():  # MLflow's per-download bars: dozens per export-version
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("skinreg").setLevel(level)
    logging.getLogger("registry_hooks").setLevel(level)
    silence_known_warnings()


def _progress() -> Callable[[str], None]:
    t0 = time.perf_counter()

    def show(msg: str) -> None:
        typer.echo(f"[{time.perf_counter() - t0:6.1f}s] {msg}", err=True)

    return show


@command("export")
@export_settings_options
def export_cmd(
    checkpoint: Annotated[Path, typer.Option(help="PyTorch .pth: a state_dict, or a dict with state_dict + metadata.")],
    arch: Annotated[Optional[str], typer.Option(help="Architecture (default: from the checkpoint, else guessed from its keys).")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Square input size (default: checkpoint's, else 224).")] = None,
    device: Annotated[Device, typer.Option(help="Device of the PyTorch reference; conversion itself runs on CPU.")] = Device.cpu,
    num_classes: Annotated[Optional[int], typer.Option(help="Expected class count (checked against the checkpoint).")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Comma-separated class labels.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="Where files go (default: beside the checkpoint).")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help=(
        "Reuse the files of an earlier export of the same checkpoint with the same settings, data and toolchain "
        "(a content-addressed cache, ~/.cache/skinreg/exports or $SKINREG_EXPORT_CACHE; off: "
        "SKINREG_EXPORT_CACHE=off).")) ] = True,
    *, settings: ExportSettings,
) -> None:
    """Export a checkpoint to ONNX and TFLite, validate every file against PyTorch, and report."""
    from skinreg.data.sources import resolve_settings
    from skinreg.errors import InputError
    from skinreg.export.job import ExportRequest
    from skinreg.export.cache import ExportCache, cache_root, export_key, run_cached
    from skinreg.models.architectures import load_checkpoint

    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available here; use --device cpu")
    settings, data = resolve_settings(settings)  # a URI is fetched into the content-hash cache, once
    out_dir = output_dir or checkpoint.parent
    store = None
    root = cache_root() if cache else None
    if root is not None and device is Device.cpu and checkpoint.is_file():
        from skinreg.convert.formats import file_sha256

        key, inputs = export_key(file_sha256(checkpoint), {"arch": arch, "num_classes": num_classes,
                                                           "input_size": input_size, "labels": labels}, settings,
                                 data, checkpoint.stem)
        store = ExportCache(root, key, inputs)

    def request() -> ExportRequest:  # only on a cache miss: a hit needs no model (nor torch imported)
        loaded = load_checkpoint(checkpoint, arch=arch, num_classes=num_classes, input_size=input_size,
                                 labels=labels.split(",") if labels else None)
        return ExportRequest(loaded=loaded, out_dir=out_dir, stem=checkpoint.stem, source=checkpoint.name,
                             **settings.request_kwargs())

    try:
        result = run_cached(request, out_dir, store, progress=_progress())
    except SkinregError as exc:
        if getattr(exc, "result", None) is not None:
            _print_report(exc.result)
        raise
    _print_report(result)


def _print_report(result: Any) -> None:
    typer.echo(result.report_md.read_text())
    if result.reused:
        typer.echo(f"reused the export stored {result.reused['created']} (cache key {result.reused['key'][:16]}: same "
                   "checkpoint bytes, settings, calibration/eval content, toolchain and CPU); every file matched its "
                   "stored sha256. Validation and timings above are that export's. --no-cache exports again.", err=True)
    typer.echo(f"report: {result.report_json}", err=True)


@command("demo-data")
def demo_data_cmd(
    output_dir: Annotated[Path, typer.Option(help="Where train/ val/ calibration/ go.")] = Path("demo/data"),
    size: Annotated[int, typer.Option(help="Image size in pixels.")] = 96,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Generate the synthetic, skin-lesion-like demo image set (ImageFolder: train / val / calibration)."""
    from skinreg.data.images import generate_demo_data

    typer.echo(str(generate_demo_data(output_dir, size=size, seed=seed)))


@command("train")
def train_cmd(
    output: Annotated[Path, typer.Option(help="Checkpoint to write (.pth).")] = Path("demo/skin_classifier.pth"),
    data_dir: Annotated[Path, typer.Option(help="Folder with train/ and val/ ImageFolders (generated if missing).")] = Path("demo/data"),
    arch: Annotated[str, typer.Option(help="Architecture (tiny_cnn: seconds on a CPU; or a torchvision one).")] = "tiny_cnn",
    input_size: Annotated[int, typer.Option()] = 96,
    epochs: Annotated[int, typer.Option()] = 8,
    seed: Annotated[int, typer.Option()] = 0,
    register_as: Annotated[Optional[str], typer.Option(help="Log to MLflow and register under this name instead of writing --output.")] = None,
    log_data: Annotated[bool, typer.Option("--log-data/--no-log-data", help=(
        "With --register-as: also log --data-dir's calibration/ and val/ folders as the run's data/calibration "
        "and data/val artifacts, so exports can use them by URI (--calibration-dir runs:/RUN_ID/data/calibration)."
    ))] = False,
) -> None:
    """Train a small classifier on the demo data: a checkpoint, or (--register-as) a registered PyTorch version."""
    if log_data and not register_as:
        from skinreg.errors import InputError

        raise InputError("--log-data logs the data to the training run: add --register-as NAME (or drop --log-data)")
    if register_as:
        from skinreg.registry.pipeline import train_and_register
        from skinreg.registry.tags import VAL_ACCURACY

        ref = train_and_register(data_dir, name=register_as, arch=arch, input_size=input_size, epochs=epochs,
                                 seed=seed, log_data=log_data, progress=_progress())
        typer.echo(f"registered {ref.uri} (val accuracy {ref.tags.get(VAL_ACCURACY)}%)")
        return
    from skinreg.data.images import generate_demo_data
    from skinreg.models.architectures import save_checkpoint
    from skinreg.models.train import train

    if not (data_dir / "train").is_dir():
        generate_demo_data(data_dir, seed=seed)
    res = train(data_dir, arch=arch, input_size=input_size, epochs=epochs, seed=seed, progress=_progress())
    save_checkpoint(res.loaded, output)
    typer.echo(f"{output}: val accuracy {res.val_accuracy:.1f}% (chance {res.chance:.1f}%)")


@command("export-version")
@export_settings_options
def export_version_cmd(
    ctx: typer.Context,
    model_uri: Annotated[str, typer.Option(help="models:/NAME/VERSION or models:/NAME@ALIAS of a PyTorch version.")],
    run_registry_code: Annotated[bool, typer.Option(help=(
        "Load the source with MLflow's own loader: a pickle, a code folder or a pt2 program from the registry, "
        "run as code in this process. Only for a version whose author you trust."))] = False,
    arch: Annotated[Optional[str], typer.Option(help="Architecture, for versions registered without skinreg metadata.")] = None,
    num_classes: Annotated[Optional[int], typer.Option()] = None,
    input_size: Annotated[Optional[int], typer.Option()] = None,
    labels: Annotated[Optional[str], typer.Option(help="Comma-separated labels.")] = None,
    name_pattern: Annotated[str, typer.Option(help="Variant model names; {source} and {variant}.")] = "{source}-{variant}",
    candidate_alias: Annotated[str, typer.Option(help="Alias set on passing variants ('' for none).")] = "candidate",
    force: Annotated[bool, typer.Option(help="Export again even if this version was exported with these settings.")] = False,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help=(
        "Reuse the files and measurements of an earlier export of the same source files with the same settings, "
        "data and toolchain (the export cache, as for `skinreg export`); registering and the consumer check of "
        "what the registry serves run as always.")) ] = True,
    *, settings: ExportSettings,
) -> None:
    """Export a registered PyTorch version: log validated variants with metrics, register them, alias `candidate`."""
    from skinreg.errors import GateError
    from skinreg.registry.pipeline import ExperimentPin, ExportOptions, export_version, hooks_settings_from_env

    opts = ExportOptions(**vars(settings), run_registry_code=run_registry_code, arch=arch, num_classes=num_classes,
                         experiment_pin=ExperimentPin.from_env(),  # set by a hooks worker for its children
                         input_size=input_size, labels=labels.split(",") if labels else None,
                         name_pattern=name_pattern, candidate_alias=candidate_alias or None, force=force,
                         cache=cache, given=_given_on_command_line(ctx))
    opts = hooks_settings_from_env(opts)  # a hooks worker's settings for its child, below the registry's tags
    res = export_version(model_uri, opts, progress=_progress())
    if res.report:
        typer.echo(res.report)
    for variant, ref in res.variants.items():
        typer.echo(f"{variant}: {ref.uri}")
    if res.failed:
        raise GateError([f"{v} (not registered): {why}" for v, why in res.failed.items()])


def _given_on_command_line(ctx: typer.Context) -> tuple[str, ...]:
    """The export settings typed on this command line: they win over the registry's `skinreg.export.*` tags."""
    return tuple(name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE")


@command("promote")
def promote_cmd(
    model_uri: Annotated[str, typer.Option(help="Source version: models:/NAME/VERSION or models:/NAME@ALIAS.")],
    alias: Annotated[str, typer.Option(help="Alias to move, e.g. production.")],
    stages: Annotated[bool, typer.Option(help="Also transition registry stages (Staging/Production), archiving the previous.")] = False,
) -> None:
    """Move an alias on a source version and on every passing variant made from it."""
    from skinreg.registry.pipeline import promote

    res = promote(model_uri, alias, stages=stages)
    for name in res.moved:
        typer.echo(f"{alias} -> {name}")
    for variant, why in res.refused.items():
        typer.echo(f"not promoted: {variant}: {why}", err=True)


@command("pull")
def pull_cmd(
    uri: Annotated[str, typer.Argument(help="Variant URI, e.g. models:/skin-classifier-tflite-int8@production.")],
    output: Annotated[Path, typer.Option(help="Folder to write the model, labels.txt and preprocessing.json into.")],
) -> None:
    """Fetch a variant for a mobile app: the .tflite (or .onnx), labels and preprocessing."""
    from skinreg.registry.classifier import pull

    for kind, path in pull(uri, output).items():
        typer.echo(f"{kind}: {path}")


@command("predict")
def predict_cmd(
    uri: Annotated[str, typer.Argument(help="Variant URI or local .onnx/.tflite.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
) -> None:
    """Classify images with an exported variant (the backend runtime)."""
    from skinreg.registry.classifier import SkinClassifier

    clf = SkinClassifier.from_uri(uri)
    for path, p in zip(images, clf.predict_batch(images)):
        typer.echo(f"{path}: {p.label} ({p.class_id}) confidence {p.confidence:.3f}")


@command("serve")
def serve_cmd(
    model: Annotated[str, typer.Option(help="The ONNX variant to serve, e.g. models:/skin-classifier-onnx@production "
                                       "(an alias is followed; models:/NAME/VERSION is pinned).")],
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8080,
    poll_s: Annotated[float, typer.Option(help="Seconds between two reads of where the alias points.")] = 5.0,
    max_batch: Annotated[int, typer.Option(help="Images run together in one ONNX Runtime call at most.")] = 8,
    max_wait_ms: Annotated[float, typer.Option(help="How long a batch waits for more requests to join it.")] = 2.0,
    threads: Annotated[int, typer.Option(help=(
        "ONNX Runtime intra-op threads (2: best measured on 2 idle cores; 1 where other work shares them)."))] = 2,
    token: Annotated[Optional[str], typer.Option(envvar="SKINREG_SERVE_TOKEN", help=(
        "Require `Authorization: Bearer TOKEN` (health probes excepted)."))] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 above).")] = 10 * 1024 * 1024,
    max_images: Annotated[int, typer.Option(help="Images in one multipart request, rows in one V2 request, at most.")] = 32,
) -> None:
    """Serve an ONNX variant over HTTP (images, KServe V2, Prometheus metrics), following its alias.
    With SKINREG_WEBHOOK_SECRET set, POST /webhook takes MLflow's signed alias events and reloads at once."""
    from skinreg.serve import ServeSettings, run

    run(ServeSettings(model=model, host=host, port=port, poll_s=poll_s, max_batch=max_batch, max_wait_ms=max_wait_ms,
                      threads=threads, token=token, max_body_bytes=max_body_bytes, max_images=max_images,
                      webhook_secret=os.environ.get("SKINREG_WEBHOOK_SECRET") or None))


@command("demo")
def demo_cmd(
    name: Annotated[str, typer.Option(help="Registered model name of the source.")] = "skin-classifier",
    data_dir: Annotated[Path, typer.Option()] = Path("demo/data"),
    arch: Annotated[str, typer.Option(help="Architecture (tiny_cnn: seconds on a CPU; or a torchvision one).")] = "tiny_cnn",
    input_size: Annotated[int, typer.Option()] = 96,
    epochs: Annotated[int, typer.Option()] = 8,
    log_data: Annotated[bool, typer.Option("--log-data/--no-log-data", help=(
        "Log the calibration and eval images with the training run (data/calibration, data/val) and export "
        "from those artifact URIs; --no-log-data: export from the local folders."))] = True,
) -> None:
    """The main job: train -> register -> export + validate -> register variants -> promote `candidate`."""
    import mlflow

    from skinreg.data.sources import source_run_data
    from skinreg.registry.pipeline import DEFAULT_EXPERIMENT, ExportOptions, run_context, export_version, promote, train_and_register

    progress = _progress()
    with run_context("main", DEFAULT_EXPERIMENT):
        ref = train_and_register(data_dir, name=name, arch=arch, input_size=input_size, epochs=epochs,
                                 log_data=log_data, progress=progress)
        calibration, evaluation = source_run_data(ref.run_id) if log_data else (None, None)
        res = export_version(ref.uri, ExportOptions(calibration_dir=calibration or data_dir / "calibration",
                                                    eval_dir=evaluation or data_dir / "val"), progress=progress)
        typer.echo(res.report)
        moved = promote(ref.uri, "candidate")
    typer.echo(f"source {ref.uri}; variants: " + ", ".join(f"{k} {v.uri}" for k, v in res.variants.items()))
    typer.echo("candidate -> " + ", ".join(moved.moved))
    if res.failed or moved.refused:
        typer.echo("not promoted: " + "; ".join(f"{k}: {v}" for k, v in {**res.failed, **moved.refused}.items()), err=True)
    typer.echo(f"open the MLflow UI: mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}", err=True)


@command("benchmark")
def benchmark_cmd(
    arch: Annotated[list[str], typer.Option(help="Architecture to benchmark (repeatable).")] = [],
    input_size: Annotated[int, typer.Option()] = 224,
    epochs: Annotated[int, typer.Option(help="Training epochs (4 reach ~97 % val on the demo data).")] = 4,
    latency_runs: Annotated[int, typer.Option()] = 50,
    int8_strategy: Annotated[str, typer.Option(help="int8 recipe(s) to compare; auto = all of them; default = what "
                                               "`skinreg export` does (its recipe, then the fallback chain).")] = "auto",
    opsets: Annotated[bool, typer.Option(help="Also time ONNX opsets 11/13/17.")] = True,
    cache: Annotated[bool, typer.Option(help="Also time `skinreg export` of the same checkpoint twice (the second "
                                        "reuses the first from an empty export cache).")] = True,
    work_dir: Annotated[Optional[Path], typer.Option(help="Keep data, files and benchmark.json here.")] = None,
) -> None:
    """Train briefly on the demo data, export with every int8 recipe, print ratios measured side by side."""
    from skinreg.cli.benchmark import DEFAULT_ARCHS, format_summary, run

    typer.echo(format_summary(run(archs=tuple(arch) or DEFAULT_ARCHS, input_size=input_size, epochs=epochs,
                                  latency_runs=latency_runs, int8_strategy=int8_strategy, opsets=opsets,
                                  cache=cache, work_dir=work_dir, progress=_progress())))


PLUGINS = "skinreg.commands"  # entry-point group: `register(app, command)` adds commands to `skinreg`


def _mount_plugins() -> None:
    """Commands of installed packages that build on skinreg (`skinreg hooks ...` and `skinreg reconcile`
    come from registry_hooks this way), found by entry point: skinreg never imports them by name."""
    from importlib.metadata import entry_points

    for plugin in entry_points(group=PLUGINS):
        plugin.load()(app, command)


_mount_plugins()


def main() -> None:
    app()
