"""litert-torch internals (checked against litert-torch 0.10.0)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from skinreg._compat import InternalMoved, moved

CHECKED_AGAINST = "0.10.0"
FIX = "strict_qdq_mode; meanwhile --int8-strategy tf-per-channel converts int8 without litert-torch"


class _StrictQdqApi:
    """Forwards to litert-converter's `converter_api_ext`; each ConvertToTFLConfig it hands out has
    strict_qdq_mode=True."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def ConvertToTFLConfig(self):  # noqa: N802 (the real name)
        cfg = self._real.ConvertToTFLConfig()
        cfg.strict_qdq_mode = True
        return cfg


def _converter_module() -> Any:
    try:
        from litert_torch._convert import litert_converter as lc

        real = lc.converter_api_ext
        has_flag = hasattr(real.ConvertToTFLConfig(), "strict_qdq_mode")
    except (ImportError, AttributeError) as exc:
        raise InternalMoved(moved("litert-torch", CHECKED_AGAINST,
                                  "_convert.litert_converter.converter_api_ext.ConvertToTFLConfig", FIX)) from exc
    if not has_flag:
        raise InternalMoved(moved("litert-torch", CHECKED_AGAINST, "ConvertToTFLConfig.strict_qdq_mode", FIX))
    return lc


@contextlib.contextmanager
def strict_qdq_mode() -> Iterator[None]:
    """litert-torch 0.10 converts a PT2E graph with strict_qdq_mode=False, and the converter then folds
    the input QUANTIZE and output DEQUANTIZE into int8 I/O tensors. No public argument sets the flag
    on that path (`_litert_converter_flags` is only read by `use_v2`, which rejects quant_config), so it
    is set here, for one conversion, on a private module attribute (restored after it)."""
    lc = _converter_module()
    real = lc.converter_api_ext
    lc.converter_api_ext = _StrictQdqApi(real)
    try:
        yield
    finally:
        lc.converter_api_ext = real


def problems() -> list[str]:
    try:
        _converter_module()
    except InternalMoved as exc:
        return [str(exc)]
    return []
