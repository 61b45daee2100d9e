#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), in the repo root, before a GPU check: downloads the wheels the
# lent GPU machine lacks into .whl/ (git-ignored), for its Python 3.12 on x86-64. Then call the device
# tool's `run` with carry [".whl"] and the command `bash benchmarks/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# What the project needs beyond that machine's image (its image has torch, transformers, accelerate,
# safetensors, psutil, tqdm, msgpack, matplotlib, pytest): hqq and the gRPC runtime our generated code needs.
for pkg in "termcolor" "grpcio==1.85.3" "grpcio-health-checking==1.85.1" "protobuf==7.36.2"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d .whl "$pkg"
done
python3 -m pip wheel -q --no-deps -w .whl "hqq==0.2.8.post1"  # published as source only: build its pure wheel here
ls -la .whl
