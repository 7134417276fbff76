"""The console output of a one-shot command, as a user sees it: `skinreg export` run as a process
from the activated venv. Converter and MLflow chatter (written to fd 2 by C++, by child processes and
by warnings) goes to a log file named in one line at the end; `-v` shows it inline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
CHATTER = ("fully_quantize", "I0000", "absl::InitializeLog", "Created TensorFlow Lite XNNPACK delegate")


def _export(ckpt: Path, data: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "TF_CPP_MIN_LOG_LEVEL": "0"}
    env.pop("SKINREG_VERBOSE", None)
    return subprocess.run([str(Path(bin_dir) / "skinreg"), *flags, "export", "--checkpoint", str(ckpt),
                           "--calibration-dir", str(data / "calibration"), "--eval-dir", str(data / "val"),
                           "--output-dir", str(out), "--latency-runs", "2"],
                          capture_output=True, text=True, env=env, timeout=600)


def test_export_console_shows_progress_and_report_and_keeps_chatter_in_a_log(trained_ckpt, demo_data, tmp_path):
    res = _export(trained_ckpt, demo_data, tmp_path / "out")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "converting TFLite int8 (tf-per-channel" in res.stderr and "| tflite-int8 | int8 |" in res.stdout
    assert [c for c in CHATTER if c in res.stderr] == [], res.stderr
    note = re.search(r"\((\d+) lines of converter/MLflow chatter in (\S+); -v shows them\)", res.stderr)
    assert note and int(note.group(1)) >= 2, res.stderr
    kept = Path(note.group(2)).read_text()
    assert "fully_quantize" in kept and "I0000" in kept
    Path(note.group(2)).unlink()


def test_verbose_export_shows_the_chatter_inline(trained_ckpt, demo_data, tmp_path):
    res = _export(trained_ckpt, demo_data, tmp_path / "out", "-v")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "converting TFLite int8 (tf-per-channel" in res.stderr and "| tflite-int8 | int8 |" in res.stdout
    assert "fully_quantize" in [c for c in CHATTER if c in res.stderr]
    assert "lines of converter/MLflow chatter" not in res.stderr
