"""The `skinreg` command line. Errors become one line on stderr and an exit code here, and only here."""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from .enums import Device, Format, Precision
from .errors import SkinregError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

app = typer.Typer(help="Export PyTorch image classifiers to validated ONNX and TFLite, driven by the MLflow registry.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def command(name: str | None = None, **kw):
    """app.command, with SkinregError turned into one stderr line and the error's exit code."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _setup_logging()
            try:
                return fn(*args, **kwargs)
            except SkinregError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(exc.exit_code) from None

        return app.command(name, **kw)(wrapper)

    return deco


def _setup_logging() -> None:
    level = logging.DEBUG if os.environ.get("SKINREG_DEBUG") else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("skinreg").setLevel(level)
    logging.getLogger("registry_hooks").setLevel(level)


def _progress() -> Callable[[str], None]:
    t0 = time.perf_counter()

    def show(msg: str) -> None:
        typer.echo(f"[{time.perf_counter() - t0:6.1f}s] {msg}", err=True)

    return show


def _parse_gates(items: list[str]) -> dict[str, float]:
    from .errors import InputError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        prec, _, field = key.partition(".")
        fields = ("min_top1_agreement", "max_abs", "max_accuracy_drop")
        if not sep or prec not in [p.value for p in Precision] or field not in fields:
            raise InputError(f"bad --gate {item!r}: expected PRECISION.FIELD=VALUE with PRECISION in "
                             f"float32/float16/int8 and FIELD in {'/'.join(fields)}, e.g. int8.min_top1_agreement=0.95")
        try:
            out[key] = float(value)
        except ValueError:
            raise InputError(f"bad --gate {item!r}: {value!r} is not a number") from None
    return out


@command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Option(help="PyTorch .pth: a state_dict, or a dict with state_dict + metadata.")],
    arch: Annotated[Optional[str], typer.Option(help="Architecture (default: from the checkpoint, else guessed from its keys).")] = None,
    format: Annotated[list[Format], typer.Option("--format", help="onnx, tflite or all (repeatable).")] = [Format.all],
    quantize: Annotated[list[Precision], typer.Option(help="Extra precisions: float16, int8 (repeatable). "
                                                      "Default: float16, plus int8 when --calibration-dir is given.")] = [],
    calibration_dir: Annotated[Optional[Path], typer.Option(help="JPG/PNG images (recursive) for int8 calibration.")] = None,
    eval_dir: Annotated[Optional[Path], typer.Option(help="ImageFolder (one folder per class) for accuracy.")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Square input size (default: checkpoint's, else 224).")] = None,
    device: Annotated[Device, typer.Option(help="Device of the PyTorch reference; conversion itself runs on CPU.")] = Device.cpu,
    num_classes: Annotated[Optional[int], typer.Option(help="Expected class count (checked against the checkpoint).")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Comma-separated class labels.")] = None,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default 17; 18+ uses the dynamo exporter).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="Where files go (default: beside the checkpoint).")] = None,
    converter: Annotated[Optional[str], typer.Option(help="TFLite converter: onnx2tf (onnx-tf is not supported).")] = None,
    gate: Annotated[list[str], typer.Option(help="Override a gate: PRECISION.FIELD=VALUE (repeatable).")] = [],
    latency_runs: Annotated[int, typer.Option(help="Timed runs per variant (after warm-up).")] = 30,
    threads: Annotated[int, typer.Option(help="Threads for every runtime.")] = 2,
) -> None:
    """Export a checkpoint to ONNX and TFLite, validate every file against PyTorch, and report."""
    from .errors import InputError
    from .export import ExportRequest, run_export
    from .models import load_checkpoint

    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available here; use --device cpu")
    loaded = load_checkpoint(checkpoint, arch=arch, num_classes=num_classes, input_size=input_size,
                             labels=labels.split(",") if labels else None)
    req = ExportRequest(loaded=loaded, out_dir=output_dir or checkpoint.parent, stem=checkpoint.stem,
                        formats=format, quantize=quantize, calibration_dir=calibration_dir, eval_dir=eval_dir,
                        opset=opset, gate_overrides=_parse_gates(gate), latency_runs=latency_runs,
                        threads=threads, converter=converter)
    try:
        result = run_export(req, progress=_progress())
    except SkinregError as exc:
        if getattr(exc, "result", None) is not None:
            typer.echo(exc.result.report_md.read_text())
            typer.echo(f"report: {exc.result.report_json}", err=True)
        raise
    typer.echo(result.report_md.read_text())
    typer.echo(f"report: {result.report_json}", err=True)


@command("demo-data")
def demo_data_cmd(
    output_dir: Annotated[Path, typer.Option(help="Where train/ val/ calibration/ go.")] = Path("demo/data"),
    per_class: Annotated[int, typer.Option(help="Training images per class (val and calibration get ~40%).")] = 40,
    size: Annotated[int, typer.Option(help="Image size in pixels.")] = 96,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Generate the synthetic, skin-lesion-like demo image set (ImageFolder: train / val / calibration)."""
    from .data import generate_demo_data

    extra = max(2, int(per_class * 0.4))
    out = generate_demo_data(output_dir, per_class={"train": per_class, "val": extra, "calibration": extra},
                             size=size, seed=seed)
    typer.echo(str(out))


@command("train")
def train_cmd(
    output: Annotated[Path, typer.Option(help="Checkpoint to write (.pth).")] = Path("demo/skin_classifier.pth"),
    data_dir: Annotated[Path, typer.Option(help="Folder with train/ and val/ ImageFolders (generated if missing).")] = Path("demo/data"),
    arch: Annotated[str, typer.Option()] = "mobilenet_v3_small",
    input_size: Annotated[int, typer.Option()] = 96,
    epochs: Annotated[int, typer.Option()] = 3,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train a small classifier on the demo data and save a checkpoint that carries its spec."""
    from .data import generate_demo_data
    from .models import save_checkpoint
    from .train import train

    if not (data_dir / "train").is_dir():
        generate_demo_data(data_dir, seed=seed)
    res = train(data_dir, arch=arch, input_size=input_size, epochs=epochs, seed=seed, progress=_progress())
    save_checkpoint(res.loaded, output)
    typer.echo(f"{output}: val accuracy {res.val_accuracy:.1f}% (chance {res.chance:.1f}%)")


def main() -> None:
    app()
