#!/usr/bin/env bash
# GPU smoke test of the fused multi-depth cross-entropy, for a machine with a GPU and
# a CUDA build of torch: builds the csrc extensions in place with the torch that is
# installed (no pip, no network), shows the CUDA build, checks the CUDA kernels
# against the plain-torch twins and the naive reference, and prints the benchmark
# table (megatron_asvr.kernels.gpu_smoke). Arguments go to gpu_smoke (--no-bench,
# --repeats N). TORCH_CUDA_ARCH_LIST picks the architectures (default "8.0;9.0").
set -euo pipefail
cd "$(dirname "$0")/.."
python setup.py build_ext --inplace
bash scripts/show_cuda_build.sh
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python -m megatron_asvr.kernels.gpu_smoke "$@"
