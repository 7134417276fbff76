"""Entry point `export`: skinreg export-version. `hooks_settings` (JSON, set by a hooks worker) is the
deployment's level of the export settings, below the registry's `skinreg.export.*` tags; every other
parameter left empty is not set, so a tag or the default applies."""
import os
import sys

from _args import EXPORT_VERSION, run

from skinreg.registry.pipeline import HOOKS_SETTINGS

argv = sys.argv[1:]
if "--hooks-settings" in argv:
    at = argv.index("--hooks-settings")
    if at + 1 < len(argv) and argv[at + 1]:
        os.environ[HOOKS_SETTINGS] = argv[at + 1]  # this process is the entry point: its environment is its own
    del argv[at:at + 2]
sys.argv[1:] = argv
run("export-version", **EXPORT_VERSION)
