#!/usr/bin/env bash
# ASVR versus LLaVA on the demo data, one command: the demo (launch/demo.sh: data, stage 0, ...;
# each of its steps is skipped when done), then for seeds 1 2 3 both arms trained (stage 1 from
# the demo's stage 0, stage 2) and evaluated; tables over seeds and figures. DEMO_DIR (default
# runs/demo) holds the demo, OUT (default runs/experiment) the results; extra arguments go to
# tools/experiment_asvr_vs_llava.py (e.g. --seeds 1 2 3 4 --stage2-steps 100).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEMO_DIR=${DEMO_DIR:-runs/demo}
DEMO_DIR="$DEMO_DIR" launch/demo.sh
python tools/experiment_asvr_vs_llava.py --demo-dir "$DEMO_DIR" --out "${OUT:-runs/experiment}" \
    --nproc "${NPROC:-2}" "$@"
