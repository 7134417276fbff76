"""PyTorch -> TFLite directly with litert-torch (Google's converter, formerly ai-edge-torch): float32,
and int8 through its PT2E quantizer (torchao prepare/convert), with no ONNX or TF SavedModel between.

The mobile contract is the same as the onnx2tf route: float32 NHWC [1, H, W, 3] in, float32
[1, num_classes] out. litert-torch 0.10's int8 output has int8 input and output tensors by default;
`strict_qdq_mode` (skinreg/_compat/litert_torch.py) keeps the QUANTIZE/DEQUANTIZE ops that PT2E placed at the graph's ends instead,
so the file takes and returns float32 (checked on every file by `_check_contract`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from skinreg._compat.litert_torch import strict_qdq_mode
from skinreg.enums import Precision
from skinreg.errors import ExportError, first_line
from skinreg.models.architectures import ModelSpec
from skinreg.convert.formats import ExportedFile

log = logging.getLogger(__name__)

CONVERTER = "litert-torch"


def _versions() -> str:
    from importlib.metadata import version

    return f"litert-torch {version('litert-torch')}, torchao {version('torchao')}"


def _import_litert():
    # litert-torch imports TensorFlow: torch/torchvision must come first (see convert.tflite).
    from skinreg.convert.tflite import _import_tensorflow_safely

    _import_tensorflow_safely()
    import litert_torch

    return litert_torch


def _check_contract(tflite: bytes, size: int, num_classes: int) -> None:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=tflite, num_threads=1)
    ins, outs = it.get_input_details(), it.get_output_details()
    got = ([(d["dtype"].__name__, tuple(int(v) for v in d["shape"])) for d in ins],
           [(d["dtype"].__name__, tuple(int(v) for v in d["shape"])) for d in outs])
    want = ([("float32", (1, size, size, 3))], [("float32", (1, num_classes))])
    if got != want:
        raise ExportError(f"litert-torch produced I/O {got}, expected {want} (float32 NHWC in, float32 logits out)")


def _nhwc_module(model: Any):
    import torch

    litert_torch = _import_litert()
    if isinstance(model, torch.fx.GraphModule):  # torch.export graphs refuse .eval(), even nested, and need none
        wrapped = litert_torch.to_channel_last_io(model, args=[0])
        wrapped.training = False
        return wrapped
    return litert_torch.to_channel_last_io(model.eval(), args=[0]).eval()


def _first_and_last_layers(model: Any) -> tuple[str, ...]:
    """Names of the first convolution and the last linear layer: the layers a quantized classifier is
    usually most sensitive to (raw pixels in, logits out)."""
    import torch

    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return tuple(n for n in (convs[:1] + linears[-1:]) if n)


def _quantizer(*, per_channel: bool, observer: str, float_layers: tuple[str, ...]):
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.observer import MinMaxObserver

    config = get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=False)
    if observer != "histogram":  # the library default for activations is HistogramObserver
        ctr = {"minmax": MinMaxObserver}[observer].with_args(eps=2**-12)
        config = replace(config, input_activation=replace(config.input_activation, observer_or_fake_quant_ctr=ctr),
                         output_activation=replace(config.output_activation, observer_or_fake_quant_ctr=ctr))

    class _Quantizer(PT2EQuantizer):
        """Leaves the named layers in float: their nodes lose the quantization annotation, so PT2E puts
        DEQUANTIZE before and QUANTIZE after them."""

        def annotate(self, model):
            model = super().annotate(model)
            if float_layers:
                for node in model.graph.nodes:
                    paths = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
                    if any(_is_layer(p, name) for p in paths for name in float_layers):
                        node.meta.pop("quantization_annotation", None)
            return model

    return _Quantizer().set_global(config)


def _is_layer(path: str, name: str) -> bool:
    """nn_module_stack paths look like "L['self'].module.features.0.0" or "module.features.0.0"."""
    path = path.replace("L['self'].", "").replace("['", ".").replace("']", "")
    return path == name or path.endswith("." + name)


def convert_float32(model: Any, size: int, num_classes: int) -> bytes:
    import torch

    litert_torch = _import_litert()
    example = (torch.zeros(1, size, size, 3),)
    try:
        tflite = litert_torch.convert(_nhwc_module(model), example).model_content()
    except Exception as exc:
        raise ExportError(f"litert-torch could not convert the model to float32 TFLite: "
                          f"{first_line(exc)}") from exc
    _check_contract(tflite, size, num_classes)
    return tflite


def nhwc_program(model: Any, size: int):
    """The model with NHWC float32 input, batch 1, as the torch.export program every int8 recipe starts from."""
    import torch

    return torch.export.export(_nhwc_module(model), (torch.zeros(1, size, size, 3),))


def convert_int8(model: Any, size: int, num_classes: int, calibration_nchw: np.ndarray, *, per_channel: bool = True,
                 observer: str = "histogram", float_layers: tuple[str, ...] = (), program: Any = None) -> bytes:
    """Static int8 via PT2E: symmetric int8 weights (per-channel or per-tensor), int8 activations
    observed on the calibration images (preprocessed exactly as at inference), float32 I/O.
    program: `nhwc_program(model, size)` when it was already made (an int8 lane loads it from a file)."""
    import torch
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    litert_torch = _import_litert()
    example = (torch.zeros(1, size, size, 3),)
    quantizer = _quantizer(per_channel=per_channel, observer=observer, float_layers=float_layers)
    try:
        graph = (program if program is not None else nhwc_program(model, size)).module()
        prepared = prepare_pt2e(graph, quantizer)  # folds BatchNorm into the convolutions
        nhwc = np.ascontiguousarray(np.transpose(np.asarray(calibration_nchw, np.float32), (0, 2, 3, 1)))
        with torch.no_grad():
            for i in range(len(nhwc)):  # the exported graph's batch is fixed at 1 (the mobile contract)
                prepared(torch.from_numpy(nhwc[i:i + 1]))
        quantized = convert_pt2e(prepared, fold_quantize=False)
        move_exported_model_to_eval(quantized)  # dropout/batch-norm ops to their eval form, in the graph
        for module in quantized.modules():  # GraphModules refuse .eval(); the flag only silences a warning
            module.training = False
        with strict_qdq_mode():
            tflite = litert_torch.convert(quantized, example,
                                          quant_config=QuantConfig(pt2e_quantizer=quantizer)).model_content()
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"litert-torch could not quantize the model to int8: "
                          f"{first_line(exc)}") from exc
    _check_contract(tflite, size, num_classes)
    return tflite


def export_litert(model: Any, spec: ModelSpec, out_dir: Path, *, stem: str, precision: Precision,
                  calibration: np.ndarray | None = None, recipe: Any = None, path: Path | None = None,
                  data: bytes | None = None, float_layers: tuple[str, ...] | None = None) -> ExportedFile:
    """float32 or int8 TFLite straight from the PyTorch model. calibration: preprocessed NCHW float32
    images; recipe: an Int8Recipe (per-channel, observer, float layers). data: the file's bytes when
    another process converted it (int8_lanes): only written here. float_layers: the layers a float-ends
    recipe keeps in float, when `model` no longer has its named modules (a graph loaded back in a lane)."""
    from skinreg.convert.tflite import tflite_path, write_tflite

    size, n = spec.preprocessing.input_size, spec.num_classes
    details: dict[str, Any] = {}
    if precision is Precision.float32:
        data = data if data is not None else convert_float32(model, size, n)
    elif precision is Precision.int8:
        if calibration is None or len(calibration) == 0:
            raise ExportError("int8 conversion needs calibration images: pass --calibration-dir DIR")
        per_channel = recipe.per_channel if recipe is not None else True
        observer = getattr(recipe, "observer", "histogram") or "histogram"
        if float_layers is None:
            float_layers = _first_and_last_layers(model) if getattr(recipe, "float_ends", False) else ()
        if data is None:
            data = convert_int8(model, size, n, calibration, per_channel=per_channel, observer=observer,
                                float_layers=float_layers)
        details.update({"calibration_count": int(len(calibration)), "observer": observer,
                        "float_layers": list(float_layers)})
        if recipe is not None:
            details["int8_recipe"] = recipe.name
    else:
        raise ExportError(f"litert-torch makes float32 and int8 TFLite here, not {precision.value}: "
                          "use the onnx2tf route (the default --converter) for float16")
    return write_tflite(data, spec, path or tflite_path(out_dir, stem, precision), precision=precision,
                        converter=CONVERTER, converter_version=_versions(), details=details)
