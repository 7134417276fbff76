"""`skinreg benchmark` on the tiny model: the printed ratios are the ones the export measured."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from skinreg.cli.main import app

pytestmark = pytest.mark.slow


def test_benchmark_prints_targets_computed_from_the_measured_report(tmp_path):
    res = CliRunner().invoke(app, ["benchmark", "--arch", "tiny_cnn", "--input-size", "64", "--epochs", "2",
                                   "--latency-runs", "3", "--int8-strategy", "litert-per-channel", "--no-opsets",
                                   "--work-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "benchmark.json").read_text())
    report = json.loads((tmp_path / "tiny_cnn" / "export" / "tiny_cnn_report.json").read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    targets = {t["name"].split(" (")[0]: t for t in summary["models"][0]["targets"]}
    assert targets["TFLite int8 size / TFLite fp32"]["measured"] == pytest.approx(
        rows["tflite-int8"]["size_bytes"] / rows["tflite-float32"]["size_bytes"])
    ms = summary["models"][0]["side_by_side_p50_ms"]  # every runtime re-timed side by side for the ratios
    # the int8 kept is litert-torch's, which makes no uint8 input: tflite-app-float32 is the only app-ready file
    assert set(ms) == {"pytorch", "onnx", "tflite-float32", "tflite-float16", "tflite-int8", "tflite-int8 (no XNNPACK)",
                       "tflite-app-float32"}
    assert any(n.startswith("No tflite-app-uint8: the int8 file kept was made by litert-per-channel") for n in report["notes"])
    assert all(v > 0 for v in ms.values())
    assert targets["TFLite int8 latency / TFLite fp32"]["measured"] == pytest.approx(ms["tflite-int8"] / ms["tflite-float32"])
    assert targets["ONNX Runtime fp32 latency / PyTorch eager"]["measured"] == pytest.approx(ms["onnx"] / ms["pytorch"])
    agreement = targets["int8 top-1 agreement with PyTorch"]
    assert agreement["measured"] == rows["tflite-int8"]["parity_top1_agreement"]
    assert rows["tflite-int8"]["converter"] == "litert-torch"
    assert "| int8 accuracy drop (points, held-out set) |" in res.stdout and "# tiny_cnn" in res.stdout
    # `skinreg export` run twice in a child process: the second reused the first (else `measured` is None)
    [again] = [t for t in summary["models"][0]["targets"] if t["name"].startswith("the same default export again")]
    first = float(re.search(r"first run (\d+) s", again["name"]).group(1))
    assert again["measured"] is not None and again["measured"] < first, again  # copied, not converted again
    assert "| the same default export again, files reused from the cache" in res.stdout
    # `skinreg export-version` of a registered version, then --force: the second reused the stored export
    [forced] = [t for t in summary["models"][0]["targets"] if t["name"].startswith("the same registered version again")]
    first = float(re.search(r"first run (\d+) s", forced["name"]).group(1))
    assert forced["measured"] is not None and forced["measured"] < first, forced
    reused = re.search(r", (\d+) consumer verdicts of byte-identical files reused;", forced["name"])
    assert reused and int(reused.group(1)) >= 3, forced["name"]  # ONNX and TFLite fp32/fp16 at least
    # the default export and the asked-for strategy, both timed in this run, with their stage breakdowns
    model = summary["models"][0]
    default = targets["default export: ONNX + TFLite float32/float16/int8"]
    assert default["measured"] == model["default_export_s"] > 0
    [vs] = [t for t in model["targets"] if t["name"].startswith("`--int8-strategy litert-per-channel` export")]
    assert vs["measured"] == pytest.approx(model["export_s"] / model["default_export_s"]) and vs["limit"] is None
    assert set(model["stage_seconds"]) == {"default", "litert-per-channel"}
    assert model["stage_seconds"]["default"]["SavedModel (onnx2tf)"] > 0
    assert "| TFLite int8 (litert-per-channel) | - |" in res.stdout  # a stage of one export only
