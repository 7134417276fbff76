"""Fences: every private API, monkeypatch and internal table of a third-party library that skinreg uses
lives in this package, one module per library, each with the version it was checked against
(`CHECKED_AGAINST`), the public path it falls back to where there is one, and `problems()`: what an
upgrade moved, one line each, naming the library and the pin. tests/test_compat.py runs every
`problems()`, so an upgrade that moves one fails there first, not somewhere deep in an export."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from skinreg.errors import SkinregError


class InternalMoved(SkinregError):
    """A third-party internal skinreg relies on is not where its fence expects it."""

    exit_code = 3


def moved(dist: str, checked_against: str, what: str, fix: str) -> str:
    """The one line that says so: the library, its installed version, the version checked, and the fix."""
    try:
        installed = version(dist)
    except PackageNotFoundError:
        installed = "not installed"
    return (f"{dist} {installed}: {what} is not where skinreg expects it (checked against {dist} "
            f"{checked_against}); install {dist}=={checked_against} (constraints.txt) or update "
            f"skinreg/_compat/ for this version ({fix})")
