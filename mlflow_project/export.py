"""Entry point `export`: skinreg export-version."""
from _args import EXPORT_VERSION, run

run("export-version", **EXPORT_VERSION)
