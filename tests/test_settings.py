"""The export settings are declared once (skinreg.export.settings.ExportSettings). Every field must be
settable from every entry point: `skinreg export`, `skinreg export-version`, the MLproject `export`
entry point (as MLflow fills its command line) and the hooks' environment, and the value must arrive
unchanged. The test enumerates the fields: a new field that some entry point cannot set fails here."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import typer
import yaml

from registry_hooks.config import ENV_PREFIX, HooksConfig, from_env
from registry_hooks.worker import _export_flags
from skinreg.cli.main import app
from skinreg.errors import InputError
from skinreg.export.settings import ExportSettings, settings_from_options

ROOT = Path(__file__).resolve().parents[1]
FIELDS = [f.name for f in fields(ExportSettings)]
# Every field away from its default, so each one is really carried (a path with a space, too).
CUSTOM = ExportSettings(formats=["onnx", "tflite"], quantize=["float16", "int8"],
                        calibration_dir=Path("/data/cal dir"), eval_dir=Path("/data/val"), opset=13,
                        gates={"int8.min_top1_agreement": 0.95, "float16.max_abs": 0.5}, latency_runs=7, threads=1,
                        converter="litert-torch", int8_strategy="auto", calibration_size=50, calibration_seed=3)


def _parse(command: str, args: list[str]) -> ExportSettings:
    """What the command would receive for these arguments (click parses them; nothing runs)."""
    click_app = typer.main.get_command(app)
    cmd = click_app.commands[command]
    ctx = cmd.make_context(command, list(args))
    return settings_from_options(ctx.params)


def test_every_field_differs_from_its_default_in_the_fixture():
    default = ExportSettings()
    assert [f for f in FIELDS if getattr(CUSTOM, f) == getattr(default, f)] == []


@pytest.mark.parametrize("command,required", [("export", ["--checkpoint", "m.pth"]),
                                              ("export-version", ["--model-uri", "models:/m/1"])])
def test_both_cli_commands_take_every_setting(command, required):
    params = {p.name for p in typer.main.get_command(app).commands[command].params}
    assert [f for f in FIELDS if f not in params] == []
    assert _parse(command, required + CUSTOM.to_cli_args()) == CUSTOM
    assert _parse(command, required) == ExportSettings()  # and nothing set means the defaults


def test_the_mlproject_export_entry_point_takes_every_setting():
    sys.path.insert(0, str(ROOT / "mlflow_project"))
    try:
        from _args import EXPORT_VERSION, translate
    finally:
        sys.path.pop(0)
    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["export"]
    assert [f for f in FIELDS if f not in entry["parameters"] or "{" + f + "}" not in entry["command"]] == []
    # As MLflow runs it: every parameter filled in (shell-quoted), then the entry point's translation.
    values = {name: "" for name in entry["parameters"]} | {"model_uri": "models:/m/1", "run_registry_code": "false",
                                                           "force": "false"} | CUSTOM.to_mlproject_params()
    argv = shlex.split(entry["command"].format(**{k: shlex.quote(v) for k, v in values.items()}))[2:]
    assert _parse("export-version", translate("export-version", argv, **EXPORT_VERSION)[1:]) == CUSTOM


def test_the_hooks_read_every_setting_from_the_environment_and_pass_it_on():
    env = {ENV_PREFIX + k.upper(): v for k, v in CUSTOM.to_mlproject_params().items()}
    cfg = from_env(env)
    assert cfg.settings() == CUSTOM
    # what the subprocess and mlflow-run executors hand their `skinreg export-version` child: the settings at
    # the hooks' level (below the registry's tags), read back by the child
    from registry_hooks.worker import _hooks_settings
    from skinreg.registry.pipeline import ExportOptions, hooks_settings_from_env

    child = hooks_settings_from_env(ExportOptions(), _hooks_settings(cfg))
    assert child.settings() == CUSTOM and set(child.origin) == set(json.loads(next(iter(_hooks_settings(cfg).values()))))
    assert _parse("export-version", ["--model-uri", "models:/m/1", *_export_flags(cfg)]) == ExportSettings()
    assert cfg.export_options().settings() == CUSTOM  # and what the in-process executor hands the pipeline
    assert {f for f in FIELDS} <= set(HooksConfig.__dataclass_fields__)


def test_hooks_can_run_auto_and_name_a_bad_value_with_its_variable():
    cfg = from_env({ENV_PREFIX + "INT8_STRATEGY": "auto", ENV_PREFIX + "CONVERTER": "onnx2tf"})
    from registry_hooks.worker import _hooks_settings

    assert '"int8_strategy": "auto"' in next(iter(_hooks_settings(cfg).values()))
    assert cfg.export_options().request_kwargs()["int8_strategy"] == "auto"
    with pytest.raises(InputError, match=r"^bad SKINREG_HOOKS_INT8_STRATEGY 'fastest': expected one of auto, "):
        from_env({ENV_PREFIX + "INT8_STRATEGY": "fastest"})
    with pytest.raises(InputError, match=r"^bad SKINREG_HOOKS_FORMATS 'onx': expected one of onnx, tflite, all"):
        from_env({ENV_PREFIX + "FORMATS": "onx"})


def test_the_services_own_settings_are_read_by_their_declared_types_and_a_bad_one_is_named():
    cfg = from_env({ENV_PREFIX + "SOURCES": "skin-classifier, lesion-b", ENV_PREFIX + "EXECUTOR": "mlflow-run",
                    ENV_PREFIX + "DOCS": "yes", ENV_PREFIX + "TOLERANCE_S": "30", ENV_PREFIX + "BACKOFF_S": "1.5",
                    ENV_PREFIX + "BACKEND_CONFIG": "k8s.json"})
    assert (cfg.sources, cfg.executor.value, cfg.docs, cfg.tolerance_s, cfg.backoff_s, cfg.backend_config) == \
        (["skin-classifier", "lesion-b"], "mlflow-run", True, 30, 1.5, "k8s.json")
    with pytest.raises(InputError, match=r"^bad SKINREG_HOOKS_EXECUTOR='mlflowrun': expected one of inprocess, "
                                         r"subprocess, mlflow-run$"):
        from_env({ENV_PREFIX + "EXECUTOR": "mlflowrun"})
    with pytest.raises(InputError, match=r"^bad SKINREG_HOOKS_TOLERANCE_S='5m': "):
        from_env({ENV_PREFIX + "TOLERANCE_S": "5m"})


def test_every_setting_can_be_set_as_a_registry_tag_and_the_command_line_wins(monkeypatch):
    """The registry's `skinreg.export.<field>` tags carry every field, as text the MLflow UI can hold (a
    version tag over a model tag); what the command line gave is kept."""
    from skinreg.registry import export_tags
    from skinreg.registry.pipeline import ExportOptions

    monkeypatch.setenv("SKINREG_DATA_ROOTS", "/data")  # the operator allows the fixture's folders
    text = {f"skinreg.export.{k}": v for k, v in CUSTOM.to_mlproject_params().items()}
    read = export_tags.read({**text, "skinreg.export.latency_runs": "99"}, {"skinreg.export.latency_runs": "7"},
                            model="m", version="1")
    assert ExportSettings(**{f: read.values[f] for f in FIELDS}) == CUSTOM
    assert read.sources["latency_runs"] == "version tag skinreg.export.latency_runs"
    assert read.sources["formats"] == "model tag skinreg.export.formats"
    merged, effective = export_tags.apply(ExportOptions(threads=2, given=("threads",)), read)
    assert merged.threads == 2 and effective["threads"] == {"value": 2, "from": "command line"}
    assert merged.settings() == ExportSettings(**{**{f: getattr(CUSTOM, f) for f in FIELDS}, "threads": 2})
