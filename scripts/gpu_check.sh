#!/usr/bin/env bash
# Issue 14's GPU check: one command on a lent GPU machine, at most 6 minutes (tools/gpu_check/run.py).
#     bash scripts/gpu_wheels.sh                  # here first: the wheels the machine lacks -> .gpu_wheels/
#     device run: bash scripts/gpu_check.sh       # with carry [".gpu_wheels"]; results land in $OUT
#     bash scripts/gpu_check.sh --cpu             # the same steps at tiny shapes on CPU (CI)
# Options: --cpu, --out DIR (default $OUT, else ./gpu_check_out). $PYTHON picks the interpreter (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m tools.gpu_check.run "$@"
