#!/usr/bin/env bash
# ASVR versus LLaVA on the demo data, one command: the demo's data (launch/demo.sh; each of its
# steps is skipped when done), then both arms trained and evaluated, a table and a loss-curve PNG.
# DEMO_DIR (default runs/demo) holds the data, OUT (default runs/experiment) the results; extra
# arguments go to tools/experiment_asvr_vs_llava.py (e.g. --stage2-steps 200).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEMO_DIR=${DEMO_DIR:-runs/demo}
DEMO_DIR="$DEMO_DIR" launch/demo.sh
python tools/experiment_asvr_vs_llava.py --demo-dir "$DEMO_DIR" --out "${OUT:-runs/experiment}" \
    --nproc "${NPROC:-2}" "$@"
