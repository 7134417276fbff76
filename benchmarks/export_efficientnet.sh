#!/usr/bin/env bash
# The export benchmark of the README: EfficientNet-B0 and MobileNetV3-large, 224 px, each trained for
# 4 epochs on the synthetic demo data, exported with every int8 recipe (--int8-strategy auto), batch 1,
# 2 threads. Prints the per-variant table, every int8 candidate and each target as a measured ratio.
# Usage: bash benchmarks/export_efficientnet.sh [extra `skinreg benchmark` options, e.g. --arch efficientnet_b0]
set -euo pipefail
cd "$(dirname "$0")/.."
make -s setup
export MLFLOW_DISABLE_TELEMETRY=true TF_CPP_MIN_LOG_LEVEL=2
mkdir -p benchmarks/out
.venv/bin/skinreg benchmark --work-dir benchmarks/out "$@" | tee benchmarks/out/benchmark.md
