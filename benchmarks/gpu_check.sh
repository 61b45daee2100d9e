#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent GPU machine (a few minutes): the CUDA tests, then the
# benchmark on the GPU (RAM and disk tiers) with the host-to-device bandwidth measured. That machine runs
# its own python3 (with torch) and reaches no registry: run benchmarks/gpu_wheels.sh here first and carry
# .whl. Results land in $OUT (the device tool brings that folder back).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONPATH="/tmp/site:$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$out/gpu.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_parity.py 2>&1 | tail -5 | tee "$out/gpu-tests.txt"
for store in ram disk; do
  python3 -c "import sys; from coordinator.cli import main; sys.exit(main(sys.argv[1:]))" bench --device cuda \
      --store "$store" --tokens 32 --workdir /tmp/moeshard-bench --systems resident,lru,lru+prefetch,naive,hf-eager,accelerate-offload \
      --json "$out/bench-cuda-$store.json" --plot "$out/bench-cuda-$store.png" 2>&1 | tail -12 | tee "$out/bench-cuda-$store.txt"
done
