"""TFLite model metadata: what an app needs to use a file without hand-written preprocessing.

Every TFLite file skinreg writes carries the standard metadata (metadata_schema.fbs, the format MediaPipe
Tasks, the TFLite Task Library and Android Studio's ML binding read): a name, a description (source,
precision, input contract, gate results), a version, the input image's colour space and normalization,
what the output is, and the labels as an associated `labels.txt` (TENSOR_AXIS_LABELS). Layout, as the
metadata writers of tflite-support and MediaPipe produce it: the metadata flatbuffer (identifier `M001`)
in a model buffer named `TFLITE_METADATA`, and the associated files in an uncompressed zip appended to
the model file. Interpreters ignore both: inference is byte for byte the same.

Written with the schema's generated code (`_metadata_schema`, copied from mediapipe) and the TFLite model
schema that ai-edge-litert ships (`_compat.ai_edge_litert.model_schema`); nothing else is needed.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np

from skinreg._compat import ai_edge_litert as compat_litert
from skinreg.convert import _metadata_schema as md
from skinreg.errors import ExportError, InputError, first_line

METADATA_BUFFER = "TFLITE_METADATA"
METADATA_IDENTIFIER = b"M001"
MODEL_IDENTIFIER = b"TFL3"
LABELS_FILE = "labels.txt"
# The oldest metadata parser that reads every field written here (image properties, normalization,
# associated files are all of the schema's first version).
MIN_PARSER_VERSION = "1.0.0"


@dataclass(frozen=True)
class InputContract:
    """What a file's input tensor takes, in the terms of the metadata's NormalizationOptions: an app hands
    RGB pixels in 0..255, and the runtime feeds `(pixel - mean) / std` (float32 input) or the pixels
    themselves (uint8 input). `name` is what tags and the registry call it."""

    name: str
    dtype: str  # "float32" or "uint8"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def describe(self) -> str:
        if self.dtype == "uint8":
            return "uint8 RGB pixels 0..255, NHWC; normalization is inside the model"
        if self.name == "pixels":
            return "float32 RGB pixels 0..255, NHWC; normalization is inside the model"
        return ("float32 RGB, NHWC, normalized per channel: (pixel/255 - mean) / std with mean "
                f"{[round(m / 255, 4) for m in self.mean]}, std {[round(s / 255, 4) for s in self.std]}")


def normalized(mean: tuple[float, ...], std: tuple[float, ...]) -> InputContract:
    """The model export guide's contract: `(pixel/255 - mean) / std` per channel, i.e. mean*255 and std*255
    in the metadata's 0..255 terms (per-channel values: MediaPipe's ImageClassifier refuses them)."""
    return InputContract("normalized", "float32", tuple(m * 255.0 for m in mean), tuple(s * 255.0 for s in std))


# App-ready contracts: the normalization is in the graph, so one mean/std (or none) describes the input.
PIXELS_FLOAT = InputContract("pixels", "float32", (0.0,), (1.0,))
PIXELS_UINT8 = InputContract("pixels-uint8", "uint8")


@dataclass(frozen=True)
class Metadata:
    name: str
    description: str
    version: str
    labels: tuple[str, ...]
    contract: InputContract
    output: str = "logits"  # "logits" or "probabilities"


def _outputs(model: Any) -> int:
    graph = model.subgraphs[0]
    return int(graph.tensors[graph.outputs[0]].shape[-1])


def _metadata_buffer(meta: Metadata) -> bytes:
    image = md.TensorMetadataT()
    image.name = "image"
    image.description = f"Input image: {meta.contract.describe()}."
    image.content = md.ContentT()
    image.content.contentPropertiesType = md.ContentProperties.ImageProperties
    image.content.contentProperties = md.ImagePropertiesT()
    image.content.contentProperties.colorSpace = md.ColorSpaceType.RGB
    stats = md.StatsT()
    stats.min, stats.max = [0.0], [255.0]
    image.stats = stats
    if meta.contract.mean:
        unit = md.ProcessUnitT()
        unit.optionsType = md.ProcessUnitOptions.NormalizationOptions
        unit.options = md.NormalizationOptionsT()
        unit.options.mean, unit.options.std = list(meta.contract.mean), list(meta.contract.std)
        image.processUnits = [unit]
    scores = md.TensorMetadataT()
    scores.name = meta.output
    scores.description = (f"One {'logit' if meta.output == 'logits' else 'probability'} per class, in the order "
                          f"of {LABELS_FILE}" + ("; apply softmax for probabilities." if meta.output == "logits" else "."))
    scores.content = md.ContentT()
    scores.content.contentPropertiesType = md.ContentProperties.FeatureProperties
    scores.content.contentProperties = md.FeaturePropertiesT()
    labels = md.AssociatedFileT()
    labels.name, labels.description = LABELS_FILE, "Class labels, one per line, in output order."
    labels.type = md.AssociatedFileType.TENSOR_AXIS_LABELS
    scores.associatedFiles = [labels]
    graph = md.SubGraphMetadataT()
    graph.name = meta.name
    graph.inputTensorMetadata, graph.outputTensorMetadata = [image], [scores]
    model = md.ModelMetadataT()
    model.name, model.description, model.version = meta.name, meta.description, meta.version
    model.author = "skinreg"
    model.subgraphMetadata = [graph]
    model.minParserVersion = MIN_PARSER_VERSION
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), METADATA_IDENTIFIER)
    return bytes(builder.Output())


def _model_without_zip(data: bytes) -> bytes:
    """The flatbuffer part of a file that may already carry associated files (a zip appended to it)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile:
        return data
    start = min((i.header_offset for i in infos), default=len(data))
    return data[:start]


def embed(data: bytes, meta: Metadata) -> bytes:
    """`data` (a .tflite file's bytes, with or without metadata) with `meta` as its only metadata."""
    schema = compat_litert.model_schema()
    data = _model_without_zip(data)
    if not schema.Model.ModelBufferHasIdentifier(data, 0):
        raise ExportError("not a TFLite flatbuffer (no TFL3 identifier): cannot add metadata")
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    if len(meta.labels) != _outputs(model):
        raise InputError(f"{len(meta.labels)} labels for a model with {_outputs(model)} outputs: pass one label "
                         "per class")
    model.metadata = list(model.metadata or [])
    model.buffers = list(model.buffers or [])
    entry = next((m for m in model.metadata if m.name in (METADATA_BUFFER, METADATA_BUFFER.encode())), None)
    if entry is None:  # a file with metadata already gets its buffer replaced, not a second one
        entry = schema.MetadataT()
        entry.name, entry.buffer = METADATA_BUFFER, len(model.buffers)
        model.buffers.append(schema.BufferT())
        model.metadata.append(entry)
    model.buffers[entry.buffer].data = np.frombuffer(_metadata_buffer(meta), dtype=np.uint8)
    builder = flatbuffers.Builder(len(data) + 4096)
    builder.Finish(model.Pack(builder), MODEL_IDENTIFIER)
    out = io.BytesIO(bytes(builder.Output()))
    out.seek(0, io.SEEK_END)
    # Uncompressed: MediaPipe reads associated files in place and refuses compressed ones. A fixed date:
    # the same model and metadata give the same bytes (and sha256) on every run.
    entry = zipfile.ZipInfo(LABELS_FILE, date_time=(1980, 1, 1, 0, 0, 0))
    entry.compress_type = zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "a") as zf:
        zf.writestr(entry, "".join(f"{label}\n" for label in meta.labels))
    return out.getvalue()


def read(data: bytes) -> dict[str, Any] | None:
    """The metadata a file carries (None if it has none), as a plain dict: name, description, version,
    min_parser_version, input {name, colour space, mean, std}, output {name, description}, labels.
    Bytes that are not a TFLite file with readable metadata are an InputError, never a traceback."""
    try:
        return _read(data)
    except Exception as exc:  # a flatbuffer or zip that does not parse, whoever wrote it
        raise InputError(f"not a TFLite file with readable metadata ({first_line(exc)}); export it again "
                         "with skinreg") from None


def _read(data: bytes) -> dict[str, Any] | None:
    schema = compat_litert.model_schema()
    if not schema.Model.ModelBufferHasIdentifier(data, 0):
        raise ValueError("no TFL3 identifier")
    model = schema.Model.GetRootAsModel(_model_without_zip(data), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() and entry.Name().decode() == METADATA_BUFFER:
            raw = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
            break
    else:
        return None
    meta = md.ModelMetadataT.InitFromPackedBuf(bytearray(raw), 0)
    graph = meta.subgraphMetadata[0]
    image, scores = graph.inputTensorMetadata[0], graph.outputTensorMetadata[0]
    norm = next((u.options for u in image.processUnits or []
                 if u.optionsType == md.ProcessUnitOptions.NormalizationOptions), None)
    files = {f.name.decode(): f.type for f in scores.associatedFiles or []}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        labels = zf.read(LABELS_FILE).decode().splitlines() if LABELS_FILE in zf.namelist() else None

    def text(v: Any) -> str | None:
        return v.decode() if isinstance(v, bytes) else v

    colour = image.content.contentProperties.colorSpace if image.content else None
    return {
        "name": text(meta.name), "description": text(meta.description), "version": text(meta.version),
        "author": text(meta.author), "min_parser_version": text(meta.minParserVersion),
        "input": {"name": text(image.name), "description": text(image.description),
                  "color_space": {md.ColorSpaceType.RGB: "RGB", md.ColorSpaceType.GRAYSCALE: "GRAYSCALE"}.get(colour),
                  "mean": [float(v) for v in norm.mean] if norm is not None else None,
                  "std": [float(v) for v in norm.std] if norm is not None else None},
        "output": {"name": text(scores.name), "description": text(scores.description),
                   "labels_file": next((n for n, t in files.items() if t == md.AssociatedFileType.TENSOR_AXIS_LABELS),
                                       None)},
        "labels": labels,
    }
