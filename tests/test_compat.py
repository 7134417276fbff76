"""Third-party internals live behind one fence per library (skinreg/_compat/, registry_hooks/_compat.py):
each fence finds what it relies on in the installed version, records the version it was checked against
(the pin in constraints.txt), and says in one line naming the library and the pin when an upgrade moved it."""

from __future__ import annotations

from importlib import import_module, resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCES = {  # fence module -> distribution
    "skinreg._compat.mlflow": "mlflow",
    "skinreg._compat.tensorflow": "tensorflow",
    "skinreg._compat.onnx2tf": "onnx2tf",
    "skinreg._compat.litert_torch": "litert-torch",
    "skinreg._compat.ai_edge_litert": "ai-edge-litert",
    "skinreg._compat.mediapipe": "mediapipe",
    "registry_hooks._compat": "procrastinate",
}


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {k.strip().lower().replace("_", "-"): v.strip() for k, v in
            (line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))}


@pytest.mark.parametrize("fence", FENCES)
def test_each_fence_finds_its_internals_in_the_pinned_version(fence):
    import torchvision  # noqa: F401  (torch before TensorFlow: convert.tflite._import_tensorflow_safely)

    module = import_module(fence)
    assert module.CHECKED_AGAINST == _pins()[FENCES[fence]], "re-check this fence against the new pin"
    assert module.problems() == []


def test_a_moved_internal_is_one_line_naming_the_library_and_the_pin():
    from registry_hooks import _compat

    schema = resources.files("procrastinate").joinpath("sql", "schema.sql").read_text()
    moved = schema.replace("queueing_lock ", "queue_lock ").replace("procrastinate_update_heartbeat_v1(",
                                                                    "procrastinate_update_heartbeat_v2(")
    found = _compat.problems(moved)
    assert len(found) == 2, found
    for line in found:
        assert "\n" not in line and "checked against procrastinate 3.10.0" in line
        assert "install procrastinate==3.10.0" in line
    assert "column procrastinate_jobs.queueing_lock" in found[0]
    assert "function procrastinate_update_heartbeat_v1" in found[1]


def test_a_fence_whose_internal_is_gone_raises_one_line():
    from skinreg._compat import InternalMoved
    from skinreg._compat.ai_edge_litert import ops_details

    class NewerInterpreter:  # an upgrade that dropped the private method
        pass

    with pytest.raises(InternalMoved, match=r"^ai-edge-litert \S+: Interpreter._get_ops_details is not where "
                                            r"skinreg expects it \(checked against ai-edge-litert 2\.3\.0\)"):
        ops_details(NewerInterpreter())
