"""`--int8-strategy auto`'s int8 recipes converted in two processes at once.

Every recipe is independent of the others, and most of a litert-torch conversion is single-threaded
Python (torch.export's tracing and decompositions: ~22 s of an EfficientNet-B0 recipe on one core),
so on a 2-core machine one process leaves a core idle for most of `auto`. Here this process converts
some recipes while a child process (`python -m skinreg.exporters.int8_lanes JOB`, no shell) converts
the others, from files this process wrote into its own private work folder:

- the calibration images, preprocessed, as one `.npy` (read with `allow_pickle=False`);
- for litert-torch recipes, the program every litert recipe starts from (`litert_export.nhwc_program`, a
  `torch.export` `.pt2`), written here from the model already in memory: never a file from the registry;
- for TF recipes, the SavedModel onnx2tf already built for the float TFLite files.

The child runs the same converter functions (`convert_int8`, `tflite_export.convert`) with the same
inputs and writes each file's bytes; this process writes them out as its own exporters would, with the
same details, then validates every candidate with the same gates. The TF recipes stay together, on one
side, because they share one calibration (`tflite_export.calibration_reused`); a float-ends recipe stays
in this process because it finds its float layers by module name. A child that fails or dies turns
each of its recipes into a conversion failure with the child's reason, like any recipe that fails.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .int8_recipes import INT8_RECIPES, LITERT_BACKEND, TF_BACKEND, Int8Recipe

log = logging.getLogger(__name__)

# Relative cost of one recipe (EfficientNet-B0 on the project machine, 100 calibration images): a TF
# calibration ~31 s and each further TF recipe <1 s; litert-torch ~40 s with histogram observers, ~33 s
# with min/max. The child pays ~8 s to import torch, TensorFlow and litert-torch.
_COST = {"tf-first": 31.0, "tf-more": 1.0, "histogram": 40.0, "minmax": 33.0}
_CHILD_START = 8.0


def lanes_available() -> int:
    """2 where this machine has a second core and SKINREG_INT8_PROCESSES is not 1."""
    wanted = os.environ.get("SKINREG_INT8_PROCESSES", "")
    if wanted.strip() == "1":
        return 1
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _cost(recipes: list[Int8Recipe]) -> float:
    tf = [r for r in recipes if r.backend == TF_BACKEND]
    rest = [r for r in recipes if r.backend != TF_BACKEND]
    return ((_COST["tf-first"] + _COST["tf-more"] * (len(tf) - 1)) if tf else 0.0) + \
        sum(_COST["minmax" if r.observer == "minmax" else "histogram"] for r in rest)


def assign(recipes: list[Int8Recipe]) -> tuple[list[Int8Recipe], list[Int8Recipe]]:
    """(this process's recipes, the child's), each in the requested order. Float-ends recipes stay here;
    the rest go, longest first, to the side that would then finish first (the child starts later)."""
    tf = [r for r in recipes if r.backend == TF_BACKEND]
    units: list[list[Int8Recipe]] = ([tf] if tf else []) + [[r] for r in recipes if r.backend != TF_BACKEND]
    mine = [r for unit in units for r in unit if r.float_ends]
    theirs: list[Int8Recipe] = []
    for unit in sorted((u for u in units if not any(r.float_ends for r in u)), key=_cost, reverse=True):
        if _cost(mine + unit) <= _cost(theirs + unit) + _CHILD_START:
            mine += unit
        else:
            theirs += unit
    order = {r.name: i for i, r in enumerate(recipes)}
    return sorted(mine, key=lambda r: order[r.name]), sorted(theirs, key=lambda r: order[r.name])


@dataclass
class Outcome:
    recipe: str
    data: bytes | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Lane:
    """The child process and where it writes."""

    proc: subprocess.Popen
    folder: Path
    recipes: list[Int8Recipe]
    started: float = field(default_factory=time.perf_counter)

    def collect(self) -> dict[str, Outcome]:
        """Wait for the child; one Outcome per recipe it was given."""
        rc = self.proc.wait()
        log_text = (self.folder / "lane.log").read_text(errors="replace") if (self.folder / "lane.log").exists() else ""
        results_file = self.folder / "results.json"
        done = json.loads(results_file.read_text()) if results_file.exists() else {}
        out = {}
        for r in self.recipes:
            got = done.get(r.name)
            if got and got.get("file"):
                out[r.name] = Outcome(r.name, data=(self.folder / got["file"]).read_bytes(), seconds=got["seconds"])
            elif got and got.get("error"):
                out[r.name] = Outcome(r.name, error=got["error"], seconds=got.get("seconds", 0.0))
            else:
                last = next((ln for ln in reversed(log_text.strip().splitlines()) if ln.strip()), "no output")
                out[r.name] = Outcome(r.name, error=f"the second int8 process exited with code {rc} before "
                                                    f"converting {r.name}: {last[:300]}")
        if rc != 0:
            log.warning("int8 lane exited with code %s; its log:\n%s", rc, log_text[-4000:])
        return out


def start(recipes: list[Int8Recipe], *, model: Any, spec: Any, calibration: np.ndarray, saved_model: Path | None,
          folder: Path) -> Lane:
    """Write the child's inputs into `folder` (this process's private work folder) and start it."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "calibration.npy", np.ascontiguousarray(calibration, dtype=np.float32), allow_pickle=False)
    job: dict[str, Any] = {"recipes": [r.name for r in recipes], "spec": spec.to_dict(), "out": str(folder)}
    if any(r.backend == LITERT_BACKEND for r in recipes):
        from .litert_export import nhwc_program

        torch.export.save(nhwc_program(model, spec.preprocessing.input_size), str(folder / "model.pt2"))
        job["model"] = str(folder / "model.pt2")
    if any(r.backend == TF_BACKEND for r in recipes):
        job["saved_model"] = str(saved_model)
    (folder / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(folder / "lane.log", "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "skinreg.exporters.int8_lanes", str(folder / "job.json")],
                                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return Lane(proc=proc, folder=folder, recipes=recipes)


def _child(job_path: Path) -> int:
    """The child's side: convert each recipe, write its bytes, record the seconds or the one-line error."""
    from ..enums import Precision
    from ..errors import first_line
    from ..models import ModelSpec

    job = json.loads(job_path.read_text())
    out, spec = Path(job["out"]), ModelSpec.from_dict(job["spec"])
    calibration = np.load(out / "calibration.npy", allow_pickle=False)
    size, n = spec.preprocessing.input_size, spec.num_classes
    recipes = [INT8_RECIPES[name] for name in job["recipes"]]
    program = None
    if job.get("model"):
        from .tflite_export import _import_tensorflow_safely

        _import_tensorflow_safely()
        import torch

        torch.set_num_threads(1)
        program = torch.export.load(job["model"])
    results: dict[str, dict] = {}
    from .tflite_export import calibration_reused

    with calibration_reused():
        for recipe in recipes:
            t0 = time.perf_counter()
            print(f"converting {recipe.name}", flush=True)
            try:
                if recipe.backend == TF_BACKEND:
                    from .tflite_export import convert

                    nhwc = np.ascontiguousarray(calibration.transpose(0, 2, 3, 1)).astype(np.float32)
                    data = convert(Path(job["saved_model"]), Precision.int8,
                                   representative=lambda: ([img[None]] for img in nhwc), per_channel=recipe.per_channel)
                else:
                    from .litert_export import convert_int8

                    data = convert_int8(None, size, n, calibration, per_channel=recipe.per_channel,
                                        observer=recipe.observer or "histogram", float_layers=(), program=program)
                (out / f"{recipe.name}.tflite").write_bytes(data)
                results[recipe.name] = {"file": f"{recipe.name}.tflite", "seconds": time.perf_counter() - t0}
            except Exception as exc:  # one recipe failing is a result; the others still run
                results[recipe.name] = {"error": first_line(exc), "seconds": time.perf_counter() - t0}
            (out / "results.json").write_text(json.dumps(results))
            print(f"{recipe.name}: {'done' if 'file' in results[recipe.name] else 'failed'} in "
                  f"{results[recipe.name]['seconds']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(_child(Path(sys.argv[1])))
