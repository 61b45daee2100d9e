#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent GPU machine (a few minutes): the CUDA tests, then the
# benchmark on the GPU with the host-to-device bandwidth measured. Results land in $OUT (or ./gpu-results).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export HF_HUB_OFFLINE=1
python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q torch==2.13.0 -e ".[dev]"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
.venv-gpu/bin/python -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.txt"
for store in ram disk; do
  .venv-gpu/bin/moe-coordinator bench --device cuda --store "$store" --tokens 32 \
      --json "$out/bench-cuda-$store.json" --plot "$out/bench-cuda-$store.png" 2>&1 | tee "$out/bench-cuda-$store.txt"
done
