#!/usr/bin/env bash
# Builds the demo's pretrained LLM, assets/demo_llm (committed; launch/demo.sh starts from it as
# real runs start from Vicuna): the demo corpus's text tokenizer, then a text-only stage 0 (DP=2,
# configs/demo_stage0.yaml) on scenes described in words followed by questions about them, exported
# as an HF LlamaForCausalLM with its tokenizer (tools/convert.py export --llm-only).
# 10000 text records (their scenes drawn, never rendered), 3000 steps: the LLM learns to answer from
# the description, yes/no and multiple choice included (README, "The two commands"). The corpus and the
# tokenizer fit are deterministic, so the tokenizer equals the one committed. Usage:
# launch/demo_llm.sh [DEST] (default assets/demo_llm, must not exist); WORK (default runs/demo_llm)
# holds the corpus and the stage-0 checkpoints. The committed assets/demo_llm was built at commit
# f1dafbb (NPROC=2); the corpus changed after it (multiple choice asks a colour, no longer a
# shape), so a rebuild trains on the new questions and fits its own tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DEST=${1:-assets/demo_llm}
WORK=${WORK:-runs/demo_llm}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-"ignore"}
[ -e "$DEST" ] && { echo "demo_llm: $DEST exists; remove it or name another destination" >&2; exit 2; }
mkdir -p "$WORK"
# The demo's own corpus (launch/demo.sh): its text is what the tokenizer is fitted to.
[ -f "$WORK/data/language.json" ] || python tools/make_demo_data.py --out "$WORK/data" --train-images 1000 \
    --eval-images 100 --max-objects 1 --language-records 10000 >/dev/null
[ -f "$WORK/encoder/config.json" ] || python tools/make_demo_encoder.py --out "$WORK/encoder" \
    --config configs/demo_stage0.yaml
[ -f "$WORK/shards/language/manifest.json" ] || python tools/preprocess.py \
    --data "language=$WORK/data/language.json" --image-root "$WORK/data/images" --tokenizer "$WORK/data" \
    --template vicuna_v1 \
    --output "$WORK/shards/language" --max-seq-length 384 --workers "$NPROC" --no-progress
# The model needs a vision tower to be built; stage 0 trains the LLM alone and the export drops it.
[ -f "$WORK/init/model_config.json" ] || python tools/convert.py import --vision "$WORK/encoder" \
    --config configs/demo_stage0.yaml --out "$WORK/init" --dtype fp32 --no-progress >/dev/null
[ -f "$WORK/stage0/latest" ] || torchrun --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29500}" \
    tools/train.py --config configs/demo_stage0.yaml --set "data.shards=$WORK/shards/language" \
    --set "data.image_root=$WORK/data/images" --set "train.load=$WORK/init" --set "train.save_dir=$WORK/stage0"
python tools/convert.py export --checkpoint "$WORK/stage0" --out "$DEST" --llm-only --dtype fp32 \
    --tokenizer "$WORK/data" --no-progress
