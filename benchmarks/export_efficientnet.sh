#!/usr/bin/env bash
# The export benchmark of the README: EfficientNet-B0, 224 px, trained briefly on the synthetic demo
# data, batch 1, 2 threads. Prints the per-variant table and each target as a measured ratio.
# Usage: bash benchmarks/export_efficientnet.sh [extra `skinreg benchmark` options]
set -euo pipefail
cd "$(dirname "$0")/.."
make -s setup
export MLFLOW_DISABLE_TELEMETRY=true TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/skinreg benchmark --work-dir benchmarks/out "$@" | tee benchmarks/out/benchmark.md
