"""Does a .tflite run where its consumers run it? Each file is loaded and invoked twice, in a child
process each time: once with the runtime's default delegates (XNNPACK: the default CPU path of
TFLite on Android, iOS and desktop) and once with the builtin kernels only. A child process,
because a broken file does not always raise: an int8 file whose activation scale is ~1e36 makes
XNNPACK refuse it ("failed to prepare") and makes the builtin kernels abort the whole process.

The runtime does not say which op it refused, so a failure is explained from the file itself:
quantized activations with absurd scales, and ADD/SUB/MUL whose input/output scales are further
apart than XNNPACK's requantization accepts, named by op."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from skinreg._compat.ai_edge_litert import ops_details
from skinreg.errors import first_line

DEFAULT = "XNNPACK (default delegates)"
BUILTIN = "builtin kernels (default delegates off)"
MODES = {DEFAULT: "AUTO", BUILTIN: "BUILTIN_WITHOUT_DEFAULT_DELEGATES"}
_CHILD_TIMEOUT_S = 300



@dataclass
class DelegateCheck:
    """errors: mode -> why it failed (absent: it ran). delegate_nodes: XNNPACK nodes with the defaults."""

    errors: dict[str, str] = field(default_factory=dict)
    delegate_nodes: int = 0
    findings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.errors

    @property
    def latency_delegate(self) -> str:
        """What the default-delegate latency of this file was measured with."""
        return "XNNPACK" if self.delegate_nodes else "builtin kernels (XNNPACK took no op)"

    def reason(self, variant: str) -> str:
        parts = [f"fails with {mode}: {why}" for mode, why in self.errors.items()]
        hint = f"; suspect op(s): {'; '.join(self.findings[:3])}" if self.findings else ""
        return f"{variant}: {' and '.join(parts)}{hint}"

    def to_dict(self) -> dict:
        return {"passed": self.passed, "errors": self.errors, "delegate_nodes": self.delegate_nodes,
                "latency_delegate": self.latency_delegate, "findings": self.findings}


def _probe(path: str, mode: str, threads: int) -> dict:
    """The child's work: load `path` with one op resolver mode, invoke it once on zeros."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=path, num_threads=threads, experimental_op_resolver_type=getattr(OpResolverType, mode))
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
    it.invoke()
    out = it.get_tensor(it.get_output_details()[0]["index"])
    nodes = sum(o["op_name"] == "DELEGATE" for o in ops_details(it))
    return {"delegate_nodes": int(nodes), "finite": bool(np.isfinite(out).all())}


def _run_child(path: Path, mode: str, threads: int) -> tuple[str | None, dict]:
    """`python -m skinreg.check.delegates PATH MODE THREADS` (no shell): an abort is a result here."""
    try:
        proc = subprocess.run([sys.executable, "-m", "skinreg.check.delegates", str(path), mode, str(threads)],
                              capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"did not finish loading and one invoke in {_CHILD_TIMEOUT_S} s", {}
    ok = [line for line in proc.stdout.splitlines() if line.startswith("SKINREG-OK ")]
    if proc.returncode == 0 and ok:
        return None, json.loads(ok[-1].split(" ", 1)[1])
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return f"the runtime killed the process ({name}) while loading or invoking it", {}
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "failed" in line]
    return first_line(errors[-1] if errors else proc.stderr.strip() or f"exit {proc.returncode}"), {}


def quantization_findings(path: Path, *, max_scale: float = 1e6, max_ratio: float = 256.0) -> list[str]:
    """Ops whose quantization parameters no int8 kernel can use, named by op type and index."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        tensors = {t["index"]: t for t in it.get_tensor_details()}
        ops = ops_details(it)
    except Exception as exc:  # an unreadable file: the runtime's own error says so elsewhere
        return [f"file cannot be read: {first_line(exc)}"]

    def scale(i: int) -> float | None:
        t = tensors.get(int(i))
        if t is None or t["dtype"].__name__ not in ("int8", "uint8", "int16"):
            return None
        s = t["quantization_parameters"]["scales"]
        return float(s[0]) if len(s) == 1 else None  # per-channel weights are not activations

    found, ratios = [], []
    for op in ops:
        outs = [s for s in (scale(i) for i in op["outputs"] if i >= 0) if s is not None]
        for s in outs:
            if not math.isfinite(s) or s <= 0 or s > max_scale:
                found.append(f"{op['op_name']} (op {op['index']}) writes an int8 activation with scale {s:.3g}")
        if op["op_name"] in ("ADD", "SUB", "MUL") and outs:
            for i in op["inputs"]:
                s = scale(i) if i >= 0 else None
                if s and outs[0] and not (1 / max_ratio <= s / outs[0] <= max_ratio):
                    ratios.append(f"{op['op_name']} (op {op['index']}) input/output scale ratio {s / outs[0]:.3g} "
                                 f"(XNNPACK accepts 1/{max_ratio:g}..{max_ratio:g})")
                    break
    return ratios + found  # the ops XNNPACK refuses first, then where the absurd scales come from


def check_delegates(path: Path, *, threads: int = 2) -> DelegateCheck:
    """Load and invoke `path` with the default delegates and with the builtin kernels only."""
    check = DelegateCheck()
    for label, mode in MODES.items():
        error, info = _run_child(Path(path), mode, threads)
        if error:
            check.errors[label] = error
        elif label == DEFAULT:
            check.delegate_nodes = int(info.get("delegate_nodes", 0))
    if check.errors:
        check.findings = quantization_findings(Path(path))
    return check


if __name__ == "__main__":  # the child of _run_child
    print("SKINREG-OK " + json.dumps(_probe(sys.argv[1], sys.argv[2], int(sys.argv[3]))), flush=True)
