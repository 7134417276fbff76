"""Shared by the entry points: MLproject passes every parameter, empty strings for "not set".
This turns `--key value` pairs into skinreg CLI flags and runs the skinreg command."""

import sys

from skinreg.cli.main import app

TRUE = {"true", "1", "yes"}
# The `export` entry point's parameters as `skinreg export-version` options (tests/test_settings.py).
EXPORT_VERSION = {"lists": ("formats", "quantize", "gates"), "flags": ("run-registry-code", "force"),
                  "rename": {"formats": "format", "gates": "gate"}}


def run(command: str, *, lists: tuple[str, ...] = (), flags: tuple[str, ...] = (), rename: dict | None = None,
        extra: tuple[str, ...] = ()) -> None:
    """extra: options the entry point always passes (not MLproject parameters)."""
    app(translate(command, sys.argv[1:], lists=lists, flags=flags, rename=rename) + list(extra))


def translate(command: str, argv: list[str], *, lists: tuple[str, ...] = (), flags: tuple[str, ...] = (),
              rename: dict | None = None) -> list[str]:
    """lists: comma-separated values that become repeated options; flags: booleans."""
    rename = rename or {}
    out = [command]
    for key, value in zip(argv[::2], argv[1::2]):
        name = key.lstrip("-")
        if value == "":
            continue
        if name in flags:
            if value.lower() in TRUE:
                out.append(f"--{rename.get(name, name)}")
            continue
        if name.replace("-", "_") in ("input_size", "epochs", "num_classes", "opset", "latency_runs", "threads",
                                      "calibration_size", "calibration_seed"):
            value = str(int(float(value)))  # MLflow passes float parameters as "96.0"
        for item in (value.split(",") if name in lists else [value]):
            out += [f"--{rename.get(name, name)}", item.strip()]
    return out
