"""ai-edge-litert internals (checked against ai-edge-litert 2.3.0)."""

from __future__ import annotations

from typing import Any

from skinreg._compat import InternalMoved, moved

CHECKED_AGAINST = "2.3.0"


def ops_details(interpreter: Any) -> list[dict[str, Any]]:
    """Each operator of a loaded model (its op_name, inputs, outputs): no public API lists them; a
    delegated subgraph shows as op_name DELEGATE."""
    get = getattr(interpreter, "_get_ops_details", None)
    if get is None:
        raise InternalMoved(moved("ai-edge-litert", CHECKED_AGAINST, "Interpreter._get_ops_details", "ops_details"))
    return get()


def model_schema() -> Any:
    """The TFLite model schema's generated Python (flatc --gen-object-api) that ai-edge-litert ships:
    reading and writing a .tflite file's tables (convert.tflite_metadata adds its metadata buffer)."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as exc:
        raise InternalMoved(moved("ai-edge-litert", CHECKED_AGAINST, "ai_edge_litert.schema_py_generated",
                                  "model_schema")) from exc
    if not all(hasattr(schema_py_generated, n) for n in ("ModelT", "BufferT", "MetadataT", "Model")):
        raise InternalMoved(moved("ai-edge-litert", CHECKED_AGAINST, "schema_py_generated.ModelT", "model_schema"))
    return schema_py_generated


def problems() -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    found = []
    if not hasattr(Interpreter, "_get_ops_details"):
        found.append(moved("ai-edge-litert", CHECKED_AGAINST, "Interpreter._get_ops_details", "ops_details"))
    try:
        model_schema()
    except InternalMoved as exc:
        found.append(str(exc))
    return found
