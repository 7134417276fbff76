"""CLI commands of registry_hooks, mounted into `skinreg` by skinreg.cli (module-level imports: typer only)."""

from __future__ import annotations

from typing import Callable

import typer


def register(app: typer.Typer, command: Callable) -> None:
    """Add `skinreg hooks ...` and `skinreg reconcile` to the skinreg app."""
