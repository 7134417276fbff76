"""Entry point `export`: skinreg export-version."""
from _args import run

run("export-version", lists=("formats", "quantize", "gates"), flags=("allow-pickle", "force"),
    rename={"formats": "format", "gates": "gate"})
