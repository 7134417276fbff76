"""ONNX -> TFLite: onnx2tf builds a TF SavedModel (NHWC), then the TF Lite converter makes
float32, float16 (float16 weights) and int8 (full-integer kernels, float32 I/O) files.

The mobile contract of these files (the model export guide's): float32 NHWC [1, H, W, 3] in, normalized per
channel, float32 [1, num_classes] out. The app-ready files (`export_app_tflite`) take RGB pixels instead
(float32, or uint8 for the full-integer one): the normalization is in their graph. Every file carries
TFLite metadata (convert.tflite_metadata) and a preprocessing JSON beside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import logging
import shutil
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable, Iterator

import numpy as np

from skinreg._compat import tensorflow as compat_tf
from skinreg._compat import onnx2tf as compat_onnx2tf
from skinreg.enums import Format, Precision
from skinreg.errors import ExportError, first_line
from skinreg.models.architectures import ModelSpec
from skinreg.convert import tf_ranges, tflite_metadata
from skinreg.convert.formats import ONNX2TF, ExportedFile, file_sha256
from skinreg.convert.onnx import INPUT_NAME

log = logging.getLogger(__name__)

CONVERTER = ONNX2TF  # its converter_version names onnx2tf and TensorFlow (the TF Lite converter)


def tflite_path(out_dir: Path, stem: str, precision: Precision) -> Path:
    suffix = "" if precision is Precision.float32 else f"_{precision.value}"
    return out_dir / f"{stem}{suffix}.tflite"


def _import_tensorflow_safely() -> None:
    """Import torch and torchvision before TensorFlow: the other order segfaults in this stack
    (`import tensorflow; import torchvision` dies in triton's C extension, exit 139; measured with
    torch 2.14.1, torchvision 0.29.1, tensorflow 2.21.0). A process that converts to TFLite may
    build a torchvision model later (the hooks worker does), so the order is fixed here."""
    import torch  # noqa: F401
    import torchvision  # noqa: F401


def _versions() -> str:
    from importlib.metadata import version

    return f"onnx2tf {version('onnx2tf')}, tensorflow {version('tensorflow')}"


def _offline_sample_data(size: int = 128) -> np.ndarray:
    """What onnx2tf checks its conversion on, instead of the 20 sample images it downloads from GitHub
    (onnx2tf/utils/common_functions.py: download_test_image_data reads them from the *working
    directory* or the network): our own synthetic images, NHWC float32 in [0, 1]."""
    from skinreg.data.images import synthetic_images

    return np.stack(synthetic_images(20, size, seed=77)).astype(np.float32) / 255.0


def simplify_onnx(path: Path, spec: ModelSpec) -> None:
    """onnxsim on a scratch copy, in-process, batch fixed at 1 (what onnx2tf's own pass does by running
    the `onnxsim` executable it finds on PATH, three times, in place)."""
    import onnx
    import onnxsim

    size = spec.preprocessing.input_size
    model, ok = onnxsim.simplify(onnx.load(str(path)), overwrite_input_shapes={INPUT_NAME: [1, 3, size, size]})
    if not ok:
        raise ExportError(f"onnxsim could not simplify {path.name} (its check failed)")
    onnx.save(model, str(path))


def zero_pad_relu_maxpools(path: Path) -> int:
    """Rewrite, in place, each padded MaxPool that reads a Relu output as Pad(0) + unpadded MaxPool;
    returns how many. Exact: after a Relu every value is >= 0, so a padded 0 never wins a max.

    Why: onnx2tf turns a MaxPool whose padding TF cannot express (ResNet's 3x3/2 pad 1 stem pool) into
    PADV2 with float32's minimum (-3.4e38) as the pad value, unless it quantizes by itself
    (onnx2tf/ops/MaxPool.py; upstream PINTO0309/onnx2tf#444, workaround in #446). The TF Lite int8
    calibrator then counts that pad value into the activation range: the stem's scale becomes ~1e36,
    XNNPACK refuses the residual ADD that mixes it with a normal scale ("failed to prepare") and the
    builtin kernels abort the process. A zero Pad quantizes to the zero point like any conv padding."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 11:  # Pad takes its pads as an input from opset 11
        return 0
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        pads = list(attrs.get("pads", []))
        src = producer.get(node.input[0]) if node.input else None
        if (node.op_type != "MaxPool" or not any(pads) or attrs.get("ceil_mode", 0)
                or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                or len(node.output) != 1 or src is None or src.op_type != "Relu"):
            nodes.append(node)
            continue
        rank = len(pads) // 2  # spatial dims; ONNX Pad wants begins then ends over all dims (N, C first)
        name = f"skinreg_zero_pad_{rewritten}"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([0, 0, *pads[:rank], 0, 0, *pads[rank:]], np.int64), f"{name}_pads"),
            numpy_helper.from_array(np.array(0.0, np.float32), f"{name}_value")])
        nodes.append(helper.make_node("Pad", [node.input[0], f"{name}_pads", f"{name}_value"], [f"{name}_out"],
                                      name=name, mode="constant"))
        pool = helper.make_node("MaxPool", [f"{name}_out"], list(node.output), name=node.name,
                                **{k: v for k, v in attrs.items() if k != "pads"})
        nodes.append(pool)
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.save(model, str(path))
    return rewritten


def _write_saved_model(model: Any, out: Path) -> None:
    """The SavedModel onnx2tf writes with output_signaturedefs (its own code: one `serving_default`
    endpoint over the Keras model's inputs), without the float32 and float16 .tflite files it then
    converts from the Keras model. skinreg never used those, and they were ~85 % of onnx2tf's time:
    each conversion serialises the Keras model again (measured: 82 of 96 s for EfficientNet-B0)."""
    import tensorflow as tf
    import tf_keras

    archive = tf_keras.export.ExportArchive()
    archive.add_endpoint(name="serving_default", fn=lambda *inputs: model(inputs),
                         input_signature=[tf.TensorSpec(t.shape, t.dtype, t.name) for t in model.inputs])
    archive.write_out(str(out))


def saved_model_from_onnx(onnx_path: Path, spec: ModelSpec, work_dir: Path, *, use_onnxsim: bool = False,
                          zero_pad_maxpools: bool = True, own_save: bool = True) -> Path:
    """onnx2tf: NCHW ONNX -> NHWC SavedModel with batch fixed at 1 (the mobile contract).

    onnx2tf rewrites its input file in place (onnxsim, then op renaming with sng4onnx), so it gets its
    own copy in `work_dir`; the file at `onnx_path` is only read. Its onnxsim pass is off: it ran
    whichever `onnxsim` was first on PATH, so the result depended on whether a venv was activated, and
    measured on EfficientNet-B0 it changed neither the TFLite file's size nor its outputs while adding
    conversion time (benchmarks/onnxsim_pass.py; docs/decisions/converters-work-on-copies.md). `use_onnxsim=True` runs
    onnxsim in-process on the copy instead, for models that need it. `zero_pad_maxpools`: see
    zero_pad_relu_maxpools (off only to reproduce the ResNet int8 failure in tests). `own_save`: see
    _write_saved_model (off: onnx2tf saves, and spends most of its time on .tflite files nobody reads)."""
    _import_tensorflow_safely()
    import onnx2tf

    compat_onnx2tf.use_sample_data(_offline_sample_data)
    size = spec.preprocessing.input_size
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    copy = work_dir / "onnx2tf_input.onnx"
    shutil.copyfile(onnx_path, copy)
    if use_onnxsim:
        simplify_onnx(copy, spec)
    if zero_pad_maxpools and (n := zero_pad_relu_maxpools(copy)):
        log.info("%d padded MaxPool after Relu rewritten as zero Pad + MaxPool for onnx2tf (int8-safe, exact)", n)
    out = work_dir / "saved_model"
    shutil.rmtree(out, ignore_errors=True)
    chatter = io.StringIO()
    try:
        # onnx2tf and TF print every tensor spec to stdout; keep it for the log, off the console.
        with contextlib.redirect_stdout(chatter):
            model = onnx2tf.convert(
                input_onnx_file_path=str(copy),
                output_folder_path=str(out),
                overwrite_input_shape=[f"{INPUT_NAME}:1,3,{size},{size}"],
                not_use_onnxsim=True,
                output_integer_quantized_tflite=False,
                copy_onnx_input_output_names_to_tflite=True,
                output_signaturedefs=True,
                                disable_model_save=own_save,
                non_verbose=True,
            )
            if own_save:
                _write_saved_model(model, out)
    except BaseException as exc:  # onnx2tf calls sys.exit on some failures
        log.error("onnx2tf output:\n%s", chatter.getvalue()[-4000:])
        raise ExportError(f"onnx2tf could not convert {Path(onnx_path).name}: {first_line(exc)}") from exc
    if not (out / "saved_model.pb").exists():
        raise ExportError(f"onnx2tf wrote no SavedModel for {Path(onnx_path).name}; see the log above")
    return out


_CALIBRATIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("skinreg_tf_calibrations", default=None)
_SPLIT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("skinreg_tf_calibration_split", default=None)
# Set only around skinreg's own `conv.convert()` (convert below): the wrapper is the original calibrator for any
# other TFLiteConverter in the process.
_CONVERTING: contextvars.ContextVar[bool] = contextvars.ContextVar("skinreg_tf_converting", default=False)
MIN_SPLIT_SAMPLES = 20  # below this, a second process costs more than it saves


def _install_calibration_memo() -> None:
    """Wrap the TF Lite converter's `Calibrator.calibrate` (once per process; skinreg/_compat/tensorflow.py):
    tf_ranges records the ranges (the calibrator's own figures, ~6x faster). Inside `calibration_reused`, a
    float model already calibrated is not calibrated again. Where tf_ranges does not apply, the converter's
    calibrator runs, inside `calibration_split` on half of the images in a second process. For a TF build
    whose Calibrator keeps no float model, and for every conversion but skinreg's own (`convert`, which sets
    _CONVERTING), it is the original: another TFLiteConverter in the same process calibrates as TF ships it."""

    def make(original: Callable) -> Callable:
        def calibrate(self, dataset_gen):
            memo, split, content = _CALIBRATIONS.get(), _SPLIT.get(), compat_tf.model_content(self)
            if content is None or not _CONVERTING.get():
                return original(self, dataset_gen)
            key = hashlib.sha256(content).hexdigest()
            if memo is not None and key in memo:
                return memo[key]

            def own(gen: Callable) -> bytes:  # the converter's calibrator, on two cores inside calibration_split
                if split is None:
                    return original(self, gen)
                return _split_calibrate(original, self, content, gen, split)

            calibrated = tf_ranges.calibrate(content, dataset_gen, own)
            if memo is not None:
                memo[key] = calibrated
            return calibrated

        return calibrate

    compat_tf.wrap_calibrate(make)


def _split_calibrate(original: Callable, cal: Any, content: bytes, dataset_gen: Callable, folder: Path) -> bytes:
    """The calibrator's work in two processes: the second half of the images in a child process
    (`python -m skinreg.convert.int8_lanes --calibrate`), the first half here, at the same time. TF Lite's
    calibration records each tensor's running minimum and maximum, so the ranges of the two halves,
    merged (the smaller minimum, the larger maximum), are the ranges of all images: the files are byte for
    byte those of one calibration (tests/test_litert.py). Any failure of the child: all images here."""
    from skinreg.convert.int8_lanes import launch_calibration

    samples = list(dataset_gen())
    if len(samples) < MIN_SPLIT_SAMPLES or not all(
            isinstance(x, (list, tuple)) and all(isinstance(a, np.ndarray) for a in x) for x in samples):
        return original(cal, lambda: iter(samples))
    half = len(samples) // 2
    child = launch_calibration(content, samples[half:], folder)
    try:
        mine = original(cal, lambda: iter(samples[:half]))
    except BaseException:
        child.proc.kill()
        raise
    theirs = child.result()
    if theirs is None:
        log.warning("the second calibration process failed (%s); calibrating every image here", child.reason())
        return original(compat_tf.calibrator_class()(content), lambda: iter(samples))
    return _merge_ranges(mine, theirs)


def _merge_ranges(a: bytes, b: bytes) -> bytes:
    """Model `a` with each tensor's recorded min/max widened to also cover `b`'s (same model, other images)."""
    flatbuffer_utils = compat_tf.flatbuffer_utils()

    ma, mb = (flatbuffer_utils.convert_bytearray_to_object(bytearray(x)) for x in (a, b))
    for ga, gb in zip(ma.subgraphs, mb.subgraphs, strict=True):
        for ta, tb in zip(ga.tensors, gb.tensors, strict=True):
            qa, qb = ta.quantization, tb.quantization
            if qa is None or qa.min is None or len(qa.min) == 0:
                continue
            qa.min = np.minimum(np.asarray(qa.min), np.asarray(qb.min))
            qa.max = np.maximum(np.asarray(qa.max), np.asarray(qb.max))
    return bytes(flatbuffer_utils.convert_object_to_bytearray(ma))


@contextlib.contextmanager
def calibration_reused() -> Iterator[None]:
    """Int8 conversions of one SavedModel with one calibration set, inside this block, calibrate once.

    The TF Lite converter spends nearly all of an int8 conversion (~30 s of ~31 s on EfficientNet-B0, 100
    images) running the float model over the calibration images to record each tensor's range; the
    quantization itself (per-channel or per-tensor) takes under a second. Two recipes of one model on one
    set record the same ranges, so the second reuses the first's calibrated model, keyed by the exact
    bytes of the float model the converter hands to its calibrator. Everything after calibration (the
    quantizer with the recipe's options, buffer deduplication, metadata) still runs per recipe, as in a
    plain `convert()`. The caller guarantees one calibration set per block."""
    _import_tensorflow_safely()
    _install_calibration_memo()
    token = _CALIBRATIONS.set({})
    try:
        yield
    finally:
        _CALIBRATIONS.reset(token)


@contextlib.contextmanager
def calibration_split(folder: Path | None) -> Iterator[None]:
    """Inside this block (folder: a private scratch folder; None: off), a calibration by the TF Lite
    converter's own calibrator (where tf_ranges does not apply, or SKINREG_TF_CALIBRATOR=tflite) runs on two
    cores: that calibrator is single-threaded (~17-31 s for 100 EfficientNet-B0 images). For when nothing
    else runs beside it: int8_lanes' second process would only take the core back."""
    if folder is None:
        yield
        return
    _import_tensorflow_safely()
    _install_calibration_memo()
    token = _SPLIT.set(folder)
    try:
        yield
    finally:
        _SPLIT.reset(token)


def convert(saved_model: Path, precision: Precision, *,
            representative: Callable[[], Iterator[list[np.ndarray]]] | None = None,
            per_channel: bool = True, uint8_input: bool = False) -> bytes:
    """uint8_input (int8 only): the input tensor is uint8 (the app-ready file); the output stays float32."""
    _import_tensorflow_safely()
    import tensorflow as tf

    _install_calibration_memo()  # int8: tf_ranges records the calibration ranges
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if precision is Precision.float16:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif precision is Precision.int8:
        if representative is None:
            raise ExportError("int8 conversion needs calibration images: pass --calibration-dir DIR")
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        compat_tf.disable_per_channel(conv, not per_channel)  # the converter's own (private) switch
        # inference_input_type / inference_output_type stay float32: the guide's mobile contract.
        if uint8_input:
            conv.inference_input_type = tf.uint8
    token = _CONVERTING.set(True)
    try:
        return conv.convert()
    except Exception as exc:
        raise ExportError(f"TF Lite converter failed for {precision.value}: {first_line(exc)}") from exc
    finally:
        _CONVERTING.reset(token)


def export_tflite(saved_model: Path, spec: ModelSpec, out_dir: Path, *, stem: str, precision: Precision,
                  calibration: np.ndarray | None = None, recipe: Any = None, path: Path | None = None,
                  data: bytes | None = None) -> ExportedFile:
    """calibration: preprocessed NCHW float32 images (the same preprocessing as inference).
    recipe: an Int8Recipe for int8 (default per-channel); path: write there instead of the guide's file name.
    data: the file's bytes when another process converted it (int8_lanes): only written here."""
    representative = None
    details: dict = {}
    if precision is Precision.int8:
        if calibration is None or len(calibration) == 0:
            raise ExportError("int8 conversion needs calibration images: pass --calibration-dir DIR")
        nhwc = np.ascontiguousarray(calibration.transpose(0, 2, 3, 1)).astype(np.float32)

        def representative() -> Iterator[list[np.ndarray]]:
            for img in nhwc:
                yield [img[None]]

        details["calibration_count"] = int(len(nhwc))
        if recipe is not None:
            details["int8_recipe"] = recipe.name
    if data is None:
        data = convert(saved_model, precision, representative=representative,
                       per_channel=recipe.per_channel if recipe is not None else True)
    return write_tflite(data, spec, path or tflite_path(out_dir, stem, precision), precision=precision,
                        converter=CONVERTER, converter_version=_versions(), details=details)


def write_tflite(data: bytes, spec: ModelSpec, path: Path, *, precision: Precision, converter: str,
                 converter_version: str, details: dict, contract: str = "normalized") -> ExportedFile:
    """Both TFLite backends end here: the file with its metadata (convert.tflite_metadata), and its NHWC
    preprocessing JSON beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_suffix(".json")
    data = tflite_metadata.embed(data, metadata(spec, name=path.stem, precision=precision, contract=contract,
                                                dtype=details.get("input_dtype", "float32")))
    try:
        path.write_bytes(data)
        replace(spec.preprocessing.with_layout("NHWC"), input=contract).save(sidecar)
    except OSError as exc:  # a full disk: no truncated file may stay behind looking like a model
        path.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        exc.filename = exc.filename or str(path)
        raise
    return ExportedFile(path=path, format=Format.tflite, precision=precision, converter=converter,
                        converter_version=converter_version, sidecar=sidecar, details=details,
                        sha256=file_sha256(path), contract=contract)


def metadata(spec: ModelSpec, *, name: str, precision: Precision, contract: str, dtype: str = "float32",
             source: str | None = None, gates: str | None = None, version: str = "1") -> tflite_metadata.Metadata:
    """What a TFLite file says about itself: its source, precision and input contract, and (once validated)
    its gate results."""
    pre = spec.preprocessing
    if contract == "pixels":
        input_contract = tflite_metadata.PIXELS_UINT8 if dtype == "uint8" else tflite_metadata.PIXELS_FLOAT
    else:
        input_contract = tflite_metadata.normalized(pre.mean, pre.std)
    weights = {Precision.float16: "float16 weights", Precision.int8: "int8 (full-integer kernels)"}.get(
        precision, "float32")
    lines = [f"{spec.arch} skin-lesion classifier, {spec.num_classes} classes, {pre.input_size}x{pre.input_size} "
             f"RGB; {weights}.",
             f"Input: {input_contract.describe()}.",
             "Output: float32 logits, one per class in the order of labels.txt (softmax gives probabilities)."]
    if source:
        lines.insert(1, f"Source: {source}.")
    if gates:
        lines.append(f"Validated against PyTorch: {gates}.")
    return tflite_metadata.Metadata(name=name, description="\n".join(lines), version=version,
                                    labels=pre.labels, contract=input_contract)


def app_saved_model(saved_model: Path, spec: ModelSpec, work_dir: Path) -> Path:
    """The app-ready SavedModel: the normalization in the graph, in front of onnx2tf's model, so the input is
    RGB pixels 0..255 (NHWC, batch 1 like the other files) and one metadata NormalizationOptions (or none,
    for uint8) describes it: MediaPipe's ImageClassifier refuses per-channel normalization metadata."""
    _import_tensorflow_safely()
    import tensorflow as tf

    pre, size = spec.preprocessing, spec.preprocessing.input_size
    inner = tf.saved_model.load(str(saved_model))
    signature = inner.signatures["serving_default"]
    (in_name,) = signature.structured_input_signature[1].keys()
    (out_name,) = signature.structured_outputs.keys()
    # (pixel * scale - mean) / std per channel, as one 1x1 depthwise convolution with a bias: one op, with
    # per-channel weights when quantized.
    scale = tf.constant((pre.scale / np.asarray(pre.std)).astype(np.float32).reshape(1, 1, 3, 1))
    shift = tf.constant((-np.asarray(pre.mean) / np.asarray(pre.std)).astype(np.float32))

    class AppReady(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])
        def serve(self, image: Any) -> dict:
            normalized = tf.nn.bias_add(tf.nn.depthwise_conv2d(image, scale, [1, 1, 1, 1], "VALID"), shift)
            return {out_name: self.inner.signatures["serving_default"](**{in_name: normalized})[out_name]}

    module = AppReady()
    out = Path(work_dir) / "saved_model_app"
    shutil.rmtree(out, ignore_errors=True)
    tf.saved_model.save(module, str(out), signatures={"serving_default": module.serve})
    return out


def export_app_tflite(app_saved: Path, spec: ModelSpec, out_dir: Path, *, stem: str, precision: Precision,
                      calibration: np.ndarray | None = None, per_channel: bool = True) -> ExportedFile:
    """An app-ready file: RGB pixels in, float32 logits out. float32: float pixels; int8: uint8 pixels (full
    integer), whose input scale must be exactly 1 and zero point 0 so that a pixel byte is its own value.
    calibration: the int8 calibration batch (normalized NCHW, as everywhere), mapped back to pixels."""
    details: dict[str, Any] = {"input_dtype": "uint8" if precision is Precision.int8 else "float32"}
    representative = None
    if precision is Precision.int8:
        if calibration is None or len(calibration) == 0:
            raise ExportError("the app-ready uint8 file needs calibration images: pass --calibration-dir DIR")
        pixels = np.round(spec.preprocessing.to_pixels(calibration, layout="NCHW")).transpose(0, 2, 3, 1)
        pixels = np.ascontiguousarray(np.clip(pixels, 0, 255), dtype=np.float32)
        # One black and one white pixel fix the input's range at 0..255 (scale 1, zero point 0), whatever the images.
        pixels[0, 0, 0], pixels[0, 0, 1] = 0.0, 255.0

        def representative() -> Iterator[list[np.ndarray]]:
            for img in pixels:
                yield [img[None]]

        details["calibration_count"] = int(len(pixels))
    data = convert(app_saved, precision, representative=representative, per_channel=per_channel,
                   uint8_input=precision is Precision.int8)
    if precision is Precision.int8:
        _check_pixel_input(data)
    suffix = "app_uint8" if precision is Precision.int8 else f"app_{precision.value}"
    return write_tflite(data, spec, out_dir / f"{stem}_{suffix}.tflite", precision=precision, converter=CONVERTER,
                        converter_version=_versions(), details=details, contract="pixels")


def _check_pixel_input(data: bytes) -> None:
    from ai_edge_litert.interpreter import Interpreter

    inp = Interpreter(model_content=data).get_input_details()[0]
    scale, zero = inp["quantization"]
    if inp["dtype"] != np.uint8 or abs(scale - 1.0) > 1e-6 or zero != 0:
        raise ExportError(f"the app-ready uint8 file's input is {np.dtype(inp['dtype']).name} with scale {scale} and "
                          f"zero point {zero}, not uint8 pixels (scale 1, zero point 0); report this as a skinreg bug")
