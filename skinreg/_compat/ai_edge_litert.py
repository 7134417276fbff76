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


def problems() -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    if not hasattr(Interpreter, "_get_ops_details"):
        return [moved("ai-edge-litert", CHECKED_AGAINST, "Interpreter._get_ops_details", "ops_details")]
    return []
