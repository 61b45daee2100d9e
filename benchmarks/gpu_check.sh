#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent GPU machine (a few minutes): the CUDA tests (parity, the
# tinygemm int4 path against the CPU kernels, byte budgets and slots on two GPUs where there are two), the quantized
# benchmark on Qwen3-30B-A3B's shape, the benchmark on the GPU (RAM and disk tiers) with the host-to-device bandwidth
# measured, then the budget sweep of every cache policy on the real shape. That machine runs
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
# moeshard itself, from this tree, beside the carried wheels (its subpackages only exist installed)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . >/dev/null
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_parity.py tests/test_kernels.py tests/test_expert_memory.py \
  2>&1 | tail -8 \
  | tee "$out/gpu-tests.txt"
bench() { python3 -m moeshard.cli bench --device cuda "$@" 2>&1 | tail -16; }
# quantized experts on the real shape (tinygemm int4 vs bf16, all resident and offloaded at equal bytes)
bench --model-kind qwen3-30b-a3b --store ram --protocol warm --tokens 32 --workdir /tmp/moeshard-bench \
    --systems resident,resident@4/4,resident@3/4,resident@2/4,lru+prefetch,lru+prefetch@4/4,hf-eager \
    --json "$out/bench-cuda-quant.json" | tee "$out/bench-cuda-quant.txt"
for store in ram disk; do
  bench --store "$store" --tokens 32 --workdir /tmp/moeshard-bench \
      --systems resident,lru,lru+prefetch,naive,hf-eager,accelerate-offload \
      --json "$out/bench-cuda-$store.json" --plot "$out/bench-cuda-$store.png" | tee "$out/bench-cuda-$store.txt"
done
# what GPU memory buys: every policy at several --expert-memory budgets, experts waiting in pinned RAM
python3 -m moeshard.cli bench --device cuda --model-kind qwen3-30b-a3b --store ram --budget-sweep 0.1,0.25,0.5,1.0 \
    --prefetch 8 --tokens 32 --workdir /tmp/moeshard-bench --json "$out/sweep-cuda.json" --plot "$out/sweep-cuda.png" \
    2>&1 | tail -30 | tee "$out/sweep-cuda.txt"
