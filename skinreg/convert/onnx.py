"""PyTorch -> ONNX with a dynamic batch axis, fixed names (`image` -> `logits`) and the
preprocessing written into `metadata_props`."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from skinreg.enums import Format, Precision
from skinreg.errors import ExportError, InputError, first_line
from skinreg.models.architectures import ModelSpec
from skinreg.convert.formats import ExportedFile, file_sha256

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "logits"
# Opset 17 is the newest the legacy TorchScript exporter supports; measured on EfficientNet-B0 here it
# runs as fast in ORT as 13 (`skinreg benchmark` times every opset side by side). 18+ goes through the
# dynamo exporter.
DEFAULT_OPSET = 17
LEGACY_MAX_OPSET = 17


def metadata(spec: ModelSpec, **extra: Any) -> dict[str, str]:
    from skinreg import __version__

    return {"skinreg_version": __version__, "arch": spec.arch, "num_classes": str(spec.num_classes),
            "preprocessing": spec.preprocessing.to_json(), "labels": json.dumps(list(spec.preprocessing.labels)),
            **{k: str(v) for k, v in extra.items()}}


def check_opset(opset: int) -> None:
    if opset < 11 or opset > 23:
        raise InputError(f"--opset {opset} is out of range: expected 11-23 (default {DEFAULT_OPSET})")


def export_onnx(model: Any, spec: ModelSpec, out_dir: Path, *, stem: str, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True) -> ExportedFile:
    import onnx
    import torch

    check_opset(opset)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.onnx"
    size = spec.preprocessing.input_size
    example = torch.zeros(2, 3, size, size)
    # A GraphModule loaded from an MLflow pt2 model cannot go through the legacy exporter
    # ("Calling train() is not supported"): it always takes the dynamo route.
    use_dynamo = opset > LEGACY_MAX_OPSET or isinstance(model, torch.fx.GraphModule)
    try:
        # torch.onnx's warnings: silenced by the entry points (quiet.silence_known_warnings), not here (threads)
        if use_dynamo:
            dyn = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
            torch.onnx.export(model, (example if dynamic_batch else example[:1],), str(path), dynamo=True,
                              opset_version=max(opset, 18), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_shapes=dyn, optimize=True,
                              external_data=False, verbose=False)
        else:
            torch.onnx.export(model, (example[:1],), str(path), dynamo=False, opset_version=opset,
                              do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
                              if dynamic_batch else None)
    except Exception as exc:
        raise ExportError(f"ONNX export of {spec.arch} failed: {first_line(exc)}") from exc

    proto = onnx.load(str(path))
    if use_dynamo:  # the dynamo exporter names I/O after the graph; enforce our contract
        _rename_io(proto)
    del proto.metadata_props[:]
    for k, v in metadata(spec, opset=opset, exporter="dynamo" if use_dynamo else "torchscript").items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected {path.name}: {first_line(exc)}") from exc
    if dynamic_batch and batch_dim(path) == 1:
        raise ExportError(f"{path.name} was exported with its batch fixed at 1 although a dynamic batch was asked "
                          "for; report this as a skinreg bug")
    real_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return ExportedFile(path=path, format=Format.onnx, precision=Precision.float32, converter="torch.onnx",
                        converter_version=torch.__version__,
                        details={"opset": real_opset, "exporter": "dynamo" if use_dynamo else "torchscript",
                                 "dynamic_batch": batch_dim(path) != 1}, sha256=file_sha256(path))


def _rename_io(proto: Any) -> None:
    renames = {proto.graph.input[0].name: INPUT_NAME, proto.graph.output[0].name: OUTPUT_NAME}
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.name = renames.get(value.name, value.name)
    for node in proto.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


def batch_dim(path: Path) -> int | str:
    """The batch dimension of the file's `image` input as written: a number (fixed) or a name (dynamic)."""
    import onnx

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param or "?" if not dim.HasField("dim_value") else int(dim.dim_value)


def read_metadata(path: Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _save_with_metadata(proto: Any, source: Path, path: Path) -> None:
    """Quantizers drop or keep metadata_props inconsistently: copy the float32 file's."""
    import onnx

    del proto.metadata_props[:]
    for k, v in read_metadata(source).items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def export_onnx_float16(fp32: ExportedFile, out_dir: Path, *, stem: str) -> ExportedFile:
    """float16 weights and activations inside, float32 `image`/`logits` outside."""
    import onnx
    from onnxconverter_common import float16

    path = out_dir / f"{stem}_float16.onnx"
    try:
        proto = float16.convert_float_to_float16(onnx.load(str(fp32.path)), keep_io_types=True)
        _save_with_metadata(proto, fp32.path, path)
    except Exception as exc:
        raise ExportError(f"ONNX float16 conversion failed: {first_line(exc)}") from exc
    from importlib.metadata import version

    return ExportedFile(path=path, format=Format.onnx, precision=Precision.float16, converter="onnxconverter-common",
                        converter_version=version("onnxconverter-common"), details={"keep_io_types": True},
                        sha256=file_sha256(path))


def export_onnx_int8(fp32: ExportedFile, out_dir: Path, *, stem: str, calibration: Any) -> ExportedFile:
    """Static QDQ int8: weights int8 per-channel, activations uint8 (U8S8). On this CPU U8S8 ran
    about 4x faster than int8 activations (S8S8) in onnxruntime 1.32 (stack-facts.md)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{INPUT_NAME: calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.items, None)

    path = out_dir / f"{stem}_int8.onnx"
    try:
        with tempfile.TemporaryDirectory(prefix="skinreg-ortq-") as scratch:  # its own copy: never the shipped file
            src = Path(scratch) / fp32.path.name
            shutil.copyfile(fp32.path, src)
            quantize_static(str(src), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        _save_with_metadata(onnx.load(str(path)), fp32.path, path)
    except Exception as exc:
        raise ExportError(f"ONNX int8 quantization failed: {first_line(exc)}") from exc
    from importlib.metadata import version

    return ExportedFile(path=path, format=Format.onnx, precision=Precision.int8, converter="onnxruntime.quantization",
                        converter_version=version("onnxruntime"),
                        details={"quant_format": "QDQ", "activations": "uint8", "weights": "int8 per-channel",
                                 "calibration_count": int(len(calibration))}, sha256=file_sha256(path))
