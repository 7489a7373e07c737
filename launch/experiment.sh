#!/usr/bin/env bash
# ASVR versus LLaVA on the demo data, one command: the demo (launch/demo.sh: data, import, ...;
# each of its steps is skipped when done), then for seeds 1 2 3 both arms trained (stage 1 from
# the demo's import, stage 2) and evaluated; tables over seeds and figures. DEMO_DIR (default
# runs/experiment_demo) holds the demo's corpus (stage-1 captions without colours), OUT (default
# runs/experiment) the results; extra arguments go to tools/experiment_asvr_vs_llava.py
# (e.g. --seeds 1 2 3 4 --stage2-steps 100).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEMO_DIR=${DEMO_DIR:-runs/experiment_demo}
# The demo's corpus with stage-1 captions that leave the colours out (the stage-2 questions ask them);
# its data, tokenizer, shards, targets and import only.
DEMO_CAPTION_COLORS=0 DEMO_PREPARE_ONLY=1 DEMO_DIR="$DEMO_DIR" launch/demo.sh
python tools/experiment_asvr_vs_llava.py --demo-dir "$DEMO_DIR" --out "${OUT:-runs/experiment}" \
    --nproc "${NPROC:-2}" "$@"
