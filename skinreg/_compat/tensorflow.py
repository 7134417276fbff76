"""TensorFlow internals of the TF Lite converter (checked against tensorflow 2.21.0). None has a public
path: the converter's per-channel switch, its calibrator class and the float model it holds, the
flatbuffer schema and utilities, and one process-wide wrapper around Calibrator.calibrate."""

from __future__ import annotations

from typing import Any, Callable

from skinreg._compat import InternalMoved, moved

CHECKED_AGAINST = "2.21.0"
_MARK = "_skinreg_wrapped"


def _fail(what: str, fix: str) -> InternalMoved:
    return InternalMoved(moved("tensorflow", CHECKED_AGAINST, what, fix))


def disable_per_channel(converter: Any, disabled: bool) -> None:
    """Per-tensor int8 weights: the converter's own switch (no public option)."""
    if not hasattr(converter, "_experimental_disable_per_channel"):
        raise _fail("TFLiteConverter._experimental_disable_per_channel", "disable_per_channel")
    converter._experimental_disable_per_channel = disabled


def calibrator_class() -> Any:
    from tensorflow.lite.python.optimize import calibrator

    return calibrator.Calibrator


def model_content(calibrator: Any) -> bytes | None:
    """The float model the converter handed its calibrator; None where this build keeps none (then the
    calibrator runs as it is)."""
    content = getattr(calibrator, "_model_content", None)
    return bytes(content) if isinstance(content, (bytes, bytearray)) else None


def wrap_calibrate(make: Callable[[Callable], Callable]) -> None:
    """Replace Calibrator.calibrate with make(original), once per process (a second call does nothing).
    Process-wide by nature: the converter calls it from inside convert(); the wrapper must behave as the
    original outside skinreg's own conversions (it reads context variables set around them)."""
    cls = calibrator_class()
    if getattr(cls.calibrate, _MARK, False):
        return
    wrapped = make(cls.calibrate)
    setattr(wrapped, _MARK, True)
    cls.calibrate = wrapped


def schema() -> Any:
    """The TF Lite flatbuffer schema as generated Python."""
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def flatbuffer_utils() -> Any:
    from tensorflow.lite.tools import flatbuffer_utils as utils

    return utils


def problems() -> list[str]:
    import inspect

    out = []
    try:
        cls = calibrator_class()
        if "_model_content" not in inspect.getsource(cls.__init__):
            out.append(moved("tensorflow", CHECKED_AGAINST, "Calibrator._model_content", "model_content"))
        if not callable(getattr(cls, "calibrate", None)):
            out.append(moved("tensorflow", CHECKED_AGAINST, "Calibrator.calibrate", "wrap_calibrate"))
    except ImportError:
        out.append(moved("tensorflow", CHECKED_AGAINST, "tensorflow.lite.python.optimize.calibrator", "calibrator_class"))
    from tensorflow.lite.python import lite

    if "_experimental_disable_per_channel" not in inspect.getsource(lite):
        out.append(moved("tensorflow", CHECKED_AGAINST, "TFLiteConverter._experimental_disable_per_channel",
                         "disable_per_channel"))
    for name, get in (("schema_py_generated", schema), ("flatbuffer_utils", flatbuffer_utils)):
        try:
            get()
        except ImportError:
            out.append(moved("tensorflow", CHECKED_AGAINST, f"tensorflow.lite ... {name}", name))
    return out
