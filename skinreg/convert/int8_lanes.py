"""`--int8-strategy auto`'s int8 recipes converted in two processes at once.

Every recipe is independent of the others, and most of a litert-torch conversion is single-threaded
Python (torch.export's tracing and decompositions: ~22 s of an EfficientNet-B0 recipe on one core),
so on a 2-core machine one process leaves a core idle for most of `auto`. Here this process converts
some recipes while a child process (`python -m skinreg.convert.int8_lanes JOB`, no shell) converts
the others, from files this process wrote into its own private work folder:

- the calibration images, preprocessed, as one `.npy` (read with `allow_pickle=False`);
- for litert-torch recipes, the program every litert recipe starts from (`convert.litert.nhwc_program`, a
  `torch.export` `.pt2`), written here from the model already in memory: never a file from the registry;
- for TF recipes, the SavedModel onnx2tf already built for the float TFLite files.

The child runs the same converter functions (`convert_int8`, `convert.tflite.convert`) with the same
inputs and writes each file's bytes; this process writes them out as its own exporters would, with the
same details, then validates every candidate with the same gates. The TF recipes stay together, on one
side, because they share one calibration (`convert.tflite.calibration_reused`); a float-ends recipe stays
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skinreg.convert.formats import LITERT_TORCH, ONNX2TF
from skinreg.convert.int8_recipes import INT8_RECIPES, Int8Recipe

log = logging.getLogger(__name__)

# Seconds per recipe on one thread (EfficientNet-B0, 100 calibration images, `skinreg benchmark` on a
# 2-core machine): a TF calibration ~33 s, each further TF recipe ~2 s; litert-torch ~44 s with histogram
# observers, ~30 s with min/max; the child pays ~8 s to import torch, TF and litert. These weights pick
# the split (TF recipes, min/max and float-ends here; the other two in the child), the fastest split
# measured; see docs/decisions/int8-lanes-split.md.
_COST = {"tf-first": 33.0, "tf-more": 2.3, "histogram": 44.0, "minmax": 30.0}
_CHILD_START = 8.0


# Below this many bytes of weights a second process costs more than it saves: it needs ~5-8 s to import
# TensorFlow (and torch, litert-torch). Measured with the demo's tiny_cnn (96 px): the default export's int8
# took 7.0 s with its calibration split across two processes; auto's int8 waited 9.2 s for the child.
# EfficientNet-B0 (16 MB of weights) gains 10-50 s.
SMALL_MODEL_BYTES = 1_000_000


def lanes_available(model: Any = None) -> int:
    """2 where this machine has a second core and `model` (when given) is not small; SKINREG_INT8_PROCESSES=1
    always keeps one process, =2 always uses a second one where there is a second core."""
    wanted = os.environ.get("SKINREG_INT8_PROCESSES", "").strip()
    if wanted == "1" or (os.cpu_count() or 1) < 2:
        return 1
    if wanted == "2" or model is None:
        return 2
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values() if hasattr(t, "numel"))
    return 2 if weights >= SMALL_MODEL_BYTES else 1


def _cost(recipes: list[Int8Recipe]) -> float:
    tf = [r for r in recipes if r.backend == ONNX2TF]
    rest = [r for r in recipes if r.backend != ONNX2TF]
    return ((_COST["tf-first"] + _COST["tf-more"] * (len(tf) - 1)) if tf else 0.0) + \
        sum(_COST["minmax" if r.observer == "minmax" else "histogram"] for r in rest)


def assign(recipes: list[Int8Recipe]) -> tuple[list[Int8Recipe], list[Int8Recipe]]:
    """(this process's recipes, the child's), each in the requested order: of every split (six recipes make
    at most 16), the one whose slower side finishes first on the estimated costs. Float-ends recipes stay
    here; the TF recipes go together."""
    import itertools

    tf = [r for r in recipes if r.backend == ONNX2TF]
    units: list[list[Int8Recipe]] = ([tf] if tf else []) + [[r] for r in recipes if r.backend != ONNX2TF]
    pinned = [u for u in units if any(r.float_ends for r in u)]
    free = [u for u in units if u not in pinned]
    best: tuple[float, list[Int8Recipe], list[Int8Recipe]] | None = None
    for sides in itertools.product((0, 1), repeat=len(free)):
        mine = [r for u in pinned for r in u] + [r for u, side in zip(free, sides) if side == 0 for r in u]
        theirs = [r for u, side in zip(free, sides) if side == 1 for r in u]
        finish = max(_cost(mine), _cost(theirs) + _CHILD_START if theirs else 0.0)
        if best is None or finish < best[0]:
            best = (finish, mine, theirs)
    order = {r.name: i for i, r in enumerate(recipes)}
    _, mine, theirs = best if best else (0.0, [], [])
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
    write_job(recipes, model=model, spec=spec, calibration=calibration, saved_model=saved_model, folder=folder)
    return launch(recipes, folder)


def write_job(recipes: list[Int8Recipe], *, model: Any, spec: Any, calibration: np.ndarray,
              saved_model: Path | None, folder: Path) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "calibration.npy", np.ascontiguousarray(calibration, dtype=np.float32), allow_pickle=False)
    job: dict[str, Any] = {"recipes": [r.name for r in recipes], "spec": spec.to_dict(), "out": str(folder)}
    if any(r.backend == LITERT_TORCH for r in recipes):
        from skinreg.convert.litert import nhwc_program

        torch.export.save(nhwc_program(model, spec.preprocessing.input_size), str(folder / "model.pt2"))
        job["model"] = str(folder / "model.pt2")
    if any(r.backend == ONNX2TF for r in recipes):
        job["saved_model"] = str(saved_model)
    (folder / "job.json").write_text(json.dumps(job))


def launch(recipes: list[Int8Recipe], folder: Path) -> Lane:
    """`python -m skinreg.convert.int8_lanes FOLDER/job.json`, one thread, output to FOLDER/lane.log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(folder / "lane.log", "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "skinreg.convert.int8_lanes", str(folder / "job.json")],
                                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return Lane(proc=proc, folder=folder, recipes=recipes)


@dataclass
class Calibration:
    """A TF Lite calibration of some images, running in a child process."""

    proc: subprocess.Popen
    folder: Path

    def result(self) -> bytes | None:
        rc = self.proc.wait()
        out = self.folder / "calibrated.tflite"
        return out.read_bytes() if rc == 0 and out.is_file() else None

    def reason(self) -> str:
        text = (self.folder / "calibrate.log").read_text(errors="replace").strip() if (
            self.folder / "calibrate.log").exists() else ""
        return f"exit code {self.proc.returncode}: {(text.splitlines() or ['no output'])[-1][:300]}"


def launch_calibration(model_content: bytes, samples: list, folder: Path) -> Calibration:
    """Calibrate `model_content` (the float model the TF Lite converter handed its calibrator) on `samples`
    (each a list of input arrays) in a child process; the arrays go as one .npz, read without pickle."""
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="calibrate-", dir=folder))
    (work / "model.tflite").write_bytes(model_content)
    np.savez(work / "samples.npz", **{f"s{i}_{j}": a for i, x in enumerate(samples) for j, a in enumerate(x)})
    (work / "job.json").write_text(json.dumps({"samples": len(samples), "inputs": len(samples[0])}))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(work / "calibrate.log", "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "skinreg.convert.int8_lanes", "--calibrate", str(work)],
                                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return Calibration(proc=proc, folder=work)


def _calibrate_child(work: Path) -> int:
    from skinreg._compat.tensorflow import calibrator_class

    job = json.loads((work / "job.json").read_text())
    with np.load(work / "samples.npz", allow_pickle=False) as data:
        samples = [[data[f"s{i}_{j}"] for j in range(job["inputs"])] for i in range(job["samples"])]
    cal = calibrator_class()((work / "model.tflite").read_bytes())
    # the converter's own call, unwrapped: this process never installs skinreg's memo
    (work / "calibrated.tflite").write_bytes(cal.calibrate(lambda: iter(samples)))
    return 0


def _child(job_path: Path) -> int:
    """The child's side: convert each recipe, write its bytes, record the seconds or the one-line error."""
    from skinreg.enums import Precision
    from skinreg.errors import first_line
    from skinreg.models.architectures import ModelSpec

    job = json.loads(job_path.read_text())
    out, spec = Path(job["out"]), ModelSpec.from_dict(job["spec"])
    calibration = np.load(out / "calibration.npy", allow_pickle=False)
    size, n = spec.preprocessing.input_size, spec.num_classes
    recipes = [INT8_RECIPES[name] for name in job["recipes"]]
    program = None
    if job.get("model"):
        from skinreg.convert.tflite import _import_tensorflow_safely

        _import_tensorflow_safely()
        import torch

        torch.set_num_threads(1)
        program = torch.export.load(job["model"])
    results: dict[str, dict] = {}
    from skinreg.convert.tflite import calibration_reused

    with calibration_reused():
        for recipe in recipes:
            t0 = time.perf_counter()
            print(f"converting {recipe.name}", flush=True)
            try:
                if recipe.backend == ONNX2TF:
                    from skinreg.convert.tflite import convert

                    nhwc = np.ascontiguousarray(calibration.transpose(0, 2, 3, 1)).astype(np.float32)
                    data = convert(Path(job["saved_model"]), Precision.int8,
                                   representative=lambda: ([img[None]] for img in nhwc), per_channel=recipe.per_channel)
                else:
                    from skinreg.convert.litert import convert_int8

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
    if sys.argv[1] == "--calibrate":
        sys.exit(_calibrate_child(Path(sys.argv[2])))
    sys.exit(_child(Path(sys.argv[1])))
