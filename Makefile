# One setup step for everything: a venv with the pinned stack (constraints.txt), skinreg itself,
# and onnx2tf installed with --no-deps (its metadata pins old tensorflow/numpy/onnx). Re-running is a
# no-op until pyproject.toml or constraints.txt change.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.skinreg-setup
export MLFLOW_DISABLE_TELEMETRY := true
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup demo hooks-demo test test-fast postgres chromium benchmark benchmark-hooks clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt onnx2tf
	$(PY) -c "import torch, torchvision, skinreg, litert_torch, onnx2tf, tensorflow, mlflow, ai_edge_litert"  # torch first: see tflite_export._import_tensorflow_safely
	touch $(STAMP)

# The main job end to end on the embedded default (SQLite registry ./mlflow.db, local artifacts):
# train -> register -> export -> validate -> register variants -> alias `candidate`.
demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" mlflow run . -e main --env-manager local

# The registry-driven service as a local cluster: a throwaway PostgreSQL (MLflow's tables + the job
# queue), `mlflow server` with webhooks, the receiver and two workers; a registered version is exported
# and promoted by the hooks alone (registry_hooks/demo.py; logs in ./hooks-demo).
hooks-demo: setup postgres
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m registry_hooks.demo

# PostgreSQL from Debian's packages: the hooks' queue and the tests that run `mlflow server` on PostgreSQL.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql)

# Chromium and its driver from Debian's packages: the test that opens `skinreg serve`'s page in a browser.
chromium:
	@test -x /usr/bin/chromium || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)

# Everything (what CI runs), on two pytest-xdist workers, each test file on one worker (its module-scoped
# fixtures built once). The slowest 15 tests are listed at the end.
test: setup postgres chromium
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# The edit loop: no long-lived servers, no TF / onnx2tf / litert-torch conversion.
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not server" --durations=10

benchmark: setup
	$(VENV)/bin/skinreg benchmark

# The hooks' queue: a burst with 1 vs 2 workers, and registration -> job start delay (registry_hooks/benchmark.py)
benchmark-hooks: setup postgres
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) benchmarks/hooks_queue.py

clean:
	rm -rf demo hooks-demo hooks-bench mlruns mlflow.db mlartifacts .pytest_cache
