"""Quiet, useful console output for the one-shot commands (`export`, `export-version`, `train`,
`demo`, `benchmark`). The lines that matter are the progress lines, the report and the URIs. Without this they
drown in chatter written straight to file descriptor 2: TensorFlow's absl start-up lines, the
TF Lite converter's `fully_quantize` line, the interpreter's XNNPACK notice, MLflow's
"Downloading artifacts" bars and the pyfunc type-hint UserWarning. That includes output from C++
and from child processes, which no Python logging setting reaches.

While a command runs, fd 2 goes through a pipe (wurlitzer's: its reader thread also flushes C's
stdio buffers). The known chatter goes to a log file and everything else passes on unchanged. When
something was held back, one line at the end says where the log file is (not after an error: its one
line stays the last). `skinreg -v ...` (or SKINREG_VERBOSE=1) turns the filter off and shows all of it
inline. Under a test runner that replaces sys.stderr, nothing is redirected."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator

import wurlitzer

CHATTER = re.compile(
    rb"^\s*(WARNING: All log messages before absl::InitializeLog"
    rb"|[IW]0000 \d"                                          # absl INFO/WARNING lines (TF start-up, cuda probes)
    rb"|fully_quantize: "                                     # the TF Lite converter's calibration line
    rb"|INFO: Created TensorFlow Lite XNNPACK delegate"
    rb"|Downloading artifacts:"                               # MLflow's per-download tqdm bars
    rb"|color_warning\("
    rb"|W\d{4} [\d:.]+ +\d+ torch/utils/_pytree\.py:\d+\] "  # torchao's register_constant deprecation (litert)
    rb"|\S+data_validation\.py:\d+: UserWarning: .*Add type hints to the `predict` method"
    # save_model of each TFLite variant; MLflow's filter_user_warnings_once puts a "once" filter above
    # any "ignore" of ours, from the logging threads, so it reaches fd 2 now and then
    rb"|\S+pyfunc/__init__\.py:\d+: UserWarning: .*An input example was not provided when logging the model)")


# Warnings that are chatter for skinreg's users: (message regex, category, module regex).
KNOWN_WARNINGS = (
    (r".*Add type hints to the `predict` method", UserWarning, ""),        # mlflow pyfunc, per TFLite variant
    (r".*An input example was not provided", UserWarning, ""),              # mlflow pyfunc save_model
    (r"\s*Warning: tf\.lite\.Interpreter is deprecated", UserWarning, ""),  # tf_ranges uses TF's calibrator runtime
    (r"", Warning, r"torch\.onnx.*"),                                       # the exporters' tracer notes
    (r".*[Ss]tage", FutureWarning, r"mlflow.*"),                              # model stages, kept for teams on them
)


def silence_known_warnings() -> None:
    """For entry points only (`skinreg`'s main, which also runs the hooks' worker and `skinreg serve`):
    process-wide filters, installed once, for the warnings in KNOWN_WARNINGS. Library code never uses
    warnings.catch_warnings(): it swaps the process-wide filter list, and with variants logged on
    several threads one thread's exit restores a list another thread changed. `-v` shows them all."""
    if verbose():
        return
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def verbose() -> bool:
    return os.environ.get("SKINREG_VERBOSE", "") not in ("", "0", "false")


class _ChatterFilter:
    """wurlitzer's stderr writer: whole lines (a progress bar's \r also ends one) that match CHATTER go to
    the log file, everything else to the real stderr (`out`, a duplicate of fd 2 taken before wurlitzer
    pointed fd 2 at its pipe)."""

    def __init__(self, out: int, log: BinaryIO) -> None:
        self.out, self.log, self.pending, self.held = out, log, b"", 0

    def write(self, chunk: bytes) -> None:
        pieces = re.split(rb"(\r\n|\r|\n)", self.pending + chunk)
        self.pending = pieces.pop()
        for text, sep in zip(pieces[::2], pieces[1::2]):
            if CHATTER.match(text):
                self.held += 1
                self.log.write(text + b"\n")
            elif text or sep != b"\r":
                os.write(self.out, text + sep)

    def close(self) -> None:
        if self.pending:
            os.write(self.out, self.pending)
            self.pending = b""


@contextlib.contextmanager
def filtered_stderr(name: str = "skinreg") -> Iterator[Path | None]:
    """Route fd 2 through the chatter filter for the duration (wurlitzer's pipe and reader thread, which also
    flush C's stdio buffers); yields the log file (None: not filtering)."""
    try:
        real = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real = False
    if verbose() or not real:
        yield None
        return
    log_path = Path(tempfile.gettempdir()) / f"{name}-{os.getpid()}.log"
    out = os.dup(2)
    ok, held = False, 0
    try:
        with open(log_path, "ab") as log:
            chatter = _ChatterFilter(out, log)
            try:
                with wurlitzer.pipes(stdout=None, stderr=chatter, encoding=None):
                    yield log_path
                    ok = True
            finally:
                chatter.close()
                held = chatter.held
    finally:
        os.close(out)
        sys.stderr.flush()
        if held and ok:  # after an error its one line stays the last word
            sys.stderr.write(f"({held} lines of converter/MLflow chatter in {log_path}; -v shows them)\n")
            sys.stderr.flush()
        elif log_path.exists() and log_path.stat().st_size == 0:
            log_path.unlink()
