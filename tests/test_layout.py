"""The architecture is enforced, not described: import-linter's contracts (pyproject.toml: skinreg's layers,
registry_hooks -> skinreg only, function-level imports included) and ruff pass, and no function of the two
packages grows past ~60 lines of body."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_BODY = 60
# Functions allowed over MAX_BODY lines of body, with their length: the list only shrinks (split one and
# remove its line); a new long function, or a listed one that grows, fails.
LONG: dict[str, int] = {}


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    proc = _run(str(BIN / "lint-imports"), "--no-cache")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_ruff_passes():
    proc = _run(str(BIN / "ruff"), "check", "skinreg", "registry_hooks", "mlflow_project", "tests", "benchmarks")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def _body_lengths() -> dict[str, int]:
    out = {}
    for package in ("skinreg", "registry_hooks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    body = node.body
                    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                        body = body[1:]  # the docstring is not body
                    out[f"{path.relative_to(ROOT)}:{node.name}"] = node.end_lineno - body[0].lineno + 1
    return out


def test_no_function_grows_past_sixty_lines_of_body():
    lengths = _body_lengths()
    too_long = {k: n for k, n in lengths.items() if n > MAX_BODY and n > LONG.get(k, MAX_BODY)}
    assert not too_long, f"over {MAX_BODY} lines of body (split them): {too_long}"
    shrunk = {k: lengths.get(k, 0) for k, n in LONG.items() if lengths.get(k, 0) <= MAX_BODY}
    assert not shrunk, f"now within {MAX_BODY} lines: remove them from LONG: {shrunk}"
