"""Typed errors. The CLI turns any SkinregError into one line on stderr (see cli.py)."""

from __future__ import annotations


class SkinregError(Exception):
    """Base class: the message names what was expected, what was found and the fix."""

    exit_code = 2


class InputError(SkinregError):
    """Bad user input: a flag, a path, a data directory."""


class CheckpointError(SkinregError):
    """A checkpoint cannot be loaded into the requested architecture."""


class UnsupportedError(SkinregError):
    """A format/precision/converter combination that is not supported."""


class ExportError(SkinregError):
    """A converter failed."""

    exit_code = 3


class GateError(SkinregError):
    """One or more variants failed their validation gates (files are kept, marked failed)."""

    exit_code = 4

    def __init__(self, failures: list[str], result: object | None = None):
        self.failures = failures
        self.result = result  # the ExportResult, so callers can still log what was measured
        super().__init__("gate failed: " + "; ".join(failures))


class RegistryError(SkinregError):
    """The MLflow registry refused or does not hold what was asked for."""

    exit_code = 5


class RegistryUnreachable(RegistryError):
    """The MLflow tracking server could not be reached: an outage, which a retry may outlive (the hooks'
    worker waits without using up an attempt), not a verdict on what was asked."""


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception's message, or its type name when it has none."""
    text = exc if isinstance(exc, str) else str(exc)
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return "" if isinstance(exc, str) else type(exc).__name__
