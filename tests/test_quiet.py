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

CHATTER = ("fully_quantize", "I0000", "absl::InitializeLog", "Created TensorFlow Lite XNNPACK delegate")


def _export(ckpt: Path, data: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "TF_CPP_MIN_LOG_LEVEL": "0"}
    env.pop("SKINREG_VERBOSE", None)
    return subprocess.run([str(Path(bin_dir) / "skinreg"), *flags, "export", "--checkpoint", str(ckpt),
                           "--calibration-dir", str(data / "calibration"), "--eval-dir", str(data / "val"),
                           "--output-dir", str(out), "--latency-runs", "2"],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
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


@pytest.mark.slow
def test_verbose_export_shows_the_chatter_inline(trained_ckpt, demo_data, tmp_path):
    res = _export(trained_ckpt, demo_data, tmp_path / "out", "-v")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "converting TFLite int8 (tf-per-channel" in res.stderr and "| tflite-int8 | int8 |" in res.stdout
    assert "fully_quantize" in [c for c in CHATTER if c in res.stderr]
    assert "lines of converter/MLflow chatter" not in res.stderr


FILTERED = """
import os, subprocess, sys
from skinreg.quiet import filtered_stderr
with filtered_stderr("skinreg-quiet-test") as log:
    os.write(2, b"I0000 00:00:1 chatter from C++\\nkept line one\\n")
    subprocess.run([sys.executable, "-c", "import os; os.write(2, b'fully_quantize: 0, inference_type: 6\\\\n')"],
                   check=True)
    os.write(2, b"Downloading artifacts: 50%\\rDownloading artifacts: 100%\\rkept line two, no newline")
print(log)
"""


def _script(text: str) -> tuple[str, Path]:
    """Run a Python program in a process of its own (stderr its real fd 2): (its stderr, the log it printed)."""
    env = {k: v for k, v in os.environ.items() if k != "SKINREG_VERBOSE"}
    res = subprocess.run([sys.executable, "-c", text], capture_output=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    return res.stderr.decode(), Path(res.stdout.decode().strip())


def test_fd2_chatter_from_this_process_and_a_child_goes_to_the_log_and_the_rest_passes():
    err, log = _script(FILTERED)
    assert err.startswith("kept line one\nkept line two, no newline"), err
    assert "I0000" not in err and "fully_quantize" not in err and "Downloading" not in err, err
    assert f"(4 lines of converter/MLflow chatter in {log}; -v shows them)" in err
    assert log.read_text().splitlines() == ["I0000 00:00:1 chatter from C++", "fully_quantize: 0, inference_type: 6",
                                            "Downloading artifacts: 50%", "Downloading artifacts: 100%"]
    log.unlink()


FAILING = """
import os
from skinreg.quiet import filtered_stderr
try:
    with filtered_stderr("skinreg-quiet-test-error") as log:
        os.write(2, b"I0000 00:00:1 chatter from C++\\n")
        raise RuntimeError("boom")
except RuntimeError:
    os.write(2, b"error: boom\\n")
print(log)
"""


def test_after_an_error_its_line_stays_the_last_one():
    err, log = _script(FAILING)
    assert err == "error: boom\n"
    assert log.read_text() == "I0000 00:00:1 chatter from C++\n"  # kept for whoever reads the error
    log.unlink()
