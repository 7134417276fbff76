"""The export settings, declared once. Every entry point derives from `ExportSettings`:

- `skinreg export` and `skinreg export-version`: `@export_settings_options` adds one CLI option per field;
- the MLproject `export` entry point: one parameter per field (`mlflow_project/export.py` passes them on);
- the pipeline's `ExportOptions` and the hooks' `HooksConfig` are subclasses, so the hooks read every
  field from `SKINREG_HOOKS_<FIELD>` and hand it to the export as `to_cli_args()`;
- `ExportRequest` is built by `request_kwargs()`; the benchmark builds its request the same way.

`tests/test_settings.py` enumerates the fields and fails when any entry point cannot set one."""

from __future__ import annotations

import functools
import inspect
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Optional

from skinreg.enums import Format, Precision
from skinreg.errors import InputError
from skinreg.convert.formats import check_converter
from skinreg.convert.int8_recipes import AUTO, INT8_RECIPES, recipes_for


class Converter(str, Enum):
    onnx2tf = "onnx2tf"
    litert_torch = "litert-torch"


# "auto" or one recipe; absent (None): the converter's recipe, then its fallback chain.
Int8Strategy = Enum("Int8Strategy", {name.replace("-", "_"): name for name in (AUTO, *INT8_RECIPES)}, type=str)


def _meta(help: str, *, list_of: type | None = None, cli: str | None = None) -> dict[str, Any]:
    return {"help": help, "list_of": list_of, "cli": cli}


@dataclass
class ExportSettings:
    """What an export does, independent of which model it exports and where the files go."""

    formats: list[Format] = field(default_factory=lambda: [Format.all], metadata=_meta(
        "onnx, tflite or all (repeatable).", list_of=Format, cli="format"))
    quantize: list[Precision] = field(default_factory=list, metadata=_meta(
        "Extra precisions: float16, int8 (repeatable). Default: float16, plus int8 when --calibration-dir is given.",
        list_of=Precision))
    calibration_dir: Optional[str] = field(default=None, metadata=_meta(
        "JPG/PNG images (recursive) for int8 calibration: a folder, or an MLflow artifact URI (runs:/RUN_ID/PATH, "
        "models:/..., mlflow-artifacts:/..., s3://..., file://...) fetched into a cache keyed by content hash "
        "(~/.cache/skinreg/data, or $SKINREG_DATA_CACHE)."))
    eval_dir: Optional[str] = field(default=None, metadata=_meta(
        "ImageFolder (one folder per class) for accuracy: a folder or an MLflow artifact URI, as --calibration-dir."))
    opset: Optional[int] = field(default=None, metadata=_meta(
        "ONNX opset (default 17; 18+ uses the dynamo exporter)."))
    gates: dict[str, float] = field(default_factory=dict, metadata=_meta(
        "Override a gate: PRECISION.FIELD=VALUE (repeatable).", list_of=str, cli="gate"))
    latency_runs: int = field(default=30, metadata=_meta("Timed runs per variant (after warm-up)."))
    threads: int = field(default=2, metadata=_meta("Threads for every runtime."))
    converter: Optional[Converter] = field(default=None, metadata=_meta(
        "TFLite converter: onnx2tf (default: ONNX -> SavedModel -> TF Lite) or litert-torch (PyTorch -> TFLite; "
        "float32 and int8)."))
    int8_strategy: Optional[Int8Strategy] = field(default=None, metadata=_meta(
        f"int8 recipe: {AUTO} (export every recipe, validate each, keep the best that passes) or one of "
        f"{', '.join(INT8_RECIPES)} (that recipe only). Default: tf-per-channel (litert-per-channel with "
        "--converter litert-torch), and if it fails to convert, to run under XNNPACK or the builtin kernels, "
        "or its gate, the next recipe of a short fallback chain until one passes."))
    calibration_size: Optional[int] = field(default=None, metadata=_meta("Subsample this many calibration images."))
    calibration_seed: int = field(default=0, metadata=_meta("Seed of the calibration subsample."))

    def __post_init__(self) -> None:
        self.normalize()

    def normalize(self) -> None:
        """Strings (env, MLproject, tests) become the declared types; a bad value is a one-line InputError."""
        self.formats = [_enum(Format, v, "format") for v in self.formats]
        self.quantize = [_enum(Precision, v, "quantize") for v in self.quantize]
        if self.converter and not isinstance(self.converter, Converter):
            check_converter(str(self.converter))  # onnx-tf gets its own explanation, not just the choices
        self.converter = _enum(Converter, self.converter, "--converter") if self.converter else None
        if self.int8_strategy and not isinstance(self.int8_strategy, Int8Strategy):
            recipes_for(str(self.int8_strategy))  # "unknown --int8-strategy 'x': expected auto or one of ..."
        self.int8_strategy = _enum(Int8Strategy, self.int8_strategy, "--int8-strategy") if self.int8_strategy else None
        for name in ("calibration_dir", "eval_dir"):  # a folder or an artifact URI, as text
            setattr(self, name, _data_location(getattr(self, name)))
        self.gates = {str(k): float(v) for k, v in dict(self.gates).items()}

    def settings(self) -> "ExportSettings":
        """Only the export settings (of a subclass such as HooksConfig or ExportOptions)."""
        return ExportSettings(**{f.name: getattr(self, f.name) for f in fields(ExportSettings)})

    def request_kwargs(self) -> dict[str, Any]:
        """The matching ExportRequest arguments."""
        return {"formats": list(self.formats), "quantize": list(self.quantize),
                "calibration_dir": _local_dir(self.calibration_dir, "calibration"),
                "eval_dir": _local_dir(self.eval_dir, "eval"), "opset": self.opset, "gate_overrides": dict(self.gates),
                "latency_runs": self.latency_runs, "threads": self.threads,
                "converter": self.converter.value if self.converter else None,
                "int8_strategy": self.int8_strategy.value if self.int8_strategy else None,
                "calibration_limit": self.calibration_size, "calibration_seed": self.calibration_seed}

    def to_cli_args(self) -> list[str]:
        """The same settings as `skinreg export-version` options (for the hooks' child processes)."""
        args: list[str] = []
        for f in fields(ExportSettings):
            value, flag = getattr(self, f.name), "--" + (f.metadata["cli"] or f.name).replace("_", "-")
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if value == default:
                continue
            if f.name == "gates":
                args += [a for k, v in value.items() for a in (flag, f"{k}={v}")]
            elif isinstance(value, list):
                args += [a for v in value for a in (flag, v.value)]
            else:
                args += [flag, value.value if isinstance(value, Enum) else str(value)]
        return args

    def to_mlproject_params(self) -> dict[str, str]:
        """The same settings as the MLproject `export` entry point's parameters ("" = not set)."""
        return {f.name: _text(getattr(self, f.name)) for f in fields(ExportSettings)}


def _data_location(value: str | Path | None) -> str | None:
    """A URI as given; a folder as pathlib spells it (as before URIs were accepted: same idempotence keys)."""
    from skinreg.data.sources import is_uri

    if value is None or str(value) == "":
        return None
    return str(value) if is_uri(str(value)) else str(Path(value))


def _local_dir(value: str | None, what: str) -> Path | None:
    """The folder an ExportRequest reads. Callers resolve URIs first (data.sources.resolve_settings, once per
    export); one still here is fetched now. A local folder is checked where it is read."""
    from skinreg.data.sources import is_uri, resolve_data_dir

    if value and is_uri(value):
        return resolve_data_dir(value, what=what)
    return Path(value) if value else None


def _text(value: Any) -> str:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return "" if value is None else str(value)


def _enum(kind: type[Enum], value: Any, what: str) -> Any:
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        raise InputError(f"bad {what} {value!r}: expected one of {', '.join(e.value for e in kind)}") from None


GATE_FIELDS = ("min_top1_agreement", "max_abs", "max_accuracy_drop")


def parse_gates(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        prec, _, name = key.partition(".")
        if not sep or prec not in [p.value for p in Precision] or name not in GATE_FIELDS:
            raise InputError(f"bad --gate {item!r}: expected PRECISION.FIELD=VALUE with PRECISION in "
                             f"float32/float16/int8 and FIELD in {'/'.join(GATE_FIELDS)}, e.g. "
                             "int8.min_top1_agreement=0.95")
        try:
            out[key] = float(value)
        except ValueError:
            raise InputError(f"bad --gate {item!r}: {value!r} is not a number") from None
    return out


def from_strings(values: Mapping[str, str], *, what: Callable[[str], str] = lambda n: n) -> dict[str, Any]:
    """ExportSettings fields from text (environment variables): lists comma-separated, gates as
    PRECISION.FIELD=VALUE items. `what(name)` names the source of a value in error messages."""
    out: dict[str, Any] = {}
    for f in fields(ExportSettings):
        raw = values.get(f.name)
        if raw is None or raw == "":
            continue
        try:
            if f.name == "gates":
                out[f.name] = parse_gates([s.strip() for s in raw.split(",") if s.strip()])
            elif f.metadata["list_of"] is not None:
                out[f.name] = [_enum(ENUMS[f.name], s.strip(), what(f.name)) for s in raw.split(",") if s.strip()]
            elif f.name in ENUMS:
                out[f.name] = _enum(ENUMS[f.name], raw.strip(), what(f.name))
            elif f.type in ("int", "Optional[int]"):
                out[f.name] = int(raw)
            else:
                out[f.name] = raw
        except ValueError as exc:
            raise InputError(f"bad {what(f.name)}={raw!r}: {exc}") from None
    return out


ENUMS: dict[str, type[Enum]] = {"formats": Format, "quantize": Precision, "converter": Converter,
                                "int8_strategy": Int8Strategy}


def settings_from_options(values: dict[str, Any]) -> ExportSettings:
    """ExportSettings from the parsed CLI options (gates arrive as PRECISION.FIELD=VALUE strings)."""
    values = {f.name: values[f.name] for f in fields(ExportSettings)}
    values["gates"] = parse_gates(list(values["gates"]))
    return ExportSettings(**values)


def _option(f: Any) -> tuple[Any, Any]:
    """(annotation, default) of the typer option for one field."""
    import typer

    opt = typer.Option("--" + (f.metadata["cli"] or f.name).replace("_", "-"), help=f.metadata["help"])
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    if f.name == "gates":
        return Annotated[list[str], opt], []
    kinds = {"list[Format]": list[Format], "list[Precision]": list[Precision], "Optional[str]": Optional[str],
             "Optional[int]": Optional[int], "int": int,
             # plain text, checked by normalize(): a bad value is one line naming the fix, not click's box
             "Optional[Converter]": Optional[str], "Optional[Int8Strategy]": Optional[str]}
    return Annotated[kinds[f.type], opt], default


def export_settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add one typer option per ExportSettings field to a command; it receives them as `settings`."""
    names = [f.name for f in fields(ExportSettings)]
    sig = inspect.signature(func, eval_str=True)  # real annotations: typer resolves none in this module
    own = [p for p in sig.parameters.values() if p.name != "settings"]
    added = []
    for f in fields(ExportSettings):
        annotation, default = _option(f)
        added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        settings = settings_from_options({n: kwargs.pop(n) for n in names})
        return func(settings=settings, **kwargs)

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # typer must read the new signature, not the wrapped function's
    return wrapper
