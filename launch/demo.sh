#!/usr/bin/env bash
# The CPU demo: synthetic data -> demo encoder + visual tokenizer -> shards + targets -> import of
# the demo's pretrained LLM (assets/demo_llm, built by launch/demo_llm.sh; DEMO_LLM names another)
# with the encoder -> stage 1 (TP=2) -> stage 2 (PP=2) -> held-out questions scored.
# Sets up its own environment (scripts/env.sh). Every step is skipped when its output exists,
# so an interrupted demo resumes; DEMO_DIR (default runs/demo) holds everything it writes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
OUT=${DEMO_DIR:-runs/demo}
NPROC=${NPROC:-2}
LLM=${DEMO_LLM:-assets/demo_llm}  # an HF LlamaForCausalLM with its tokenizer, as Vicuna in real runs
CAPTIONS=${DEMO_CAPTION_COLORS:-1}  # 0: stage-1 captions leave the colours out (the experiment's corpus)
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# megatron-core's notices that a CPU machine lacks Transformer Engine / apex, and
# deprecations inside megatron and torch: noise on the demo's console.
export PYTHONWARNINGS=${PYTHONWARNINGS:-"ignore:Transformer Engine and Apex are not installed,ignore:Apex is not installed,ignore:full scope is deprecated,ignore:When using async grad allreduce,ignore:Please use DTensor instead,ignore:\`load_state_dict\` is deprecated"}
start=$(date +%s)
say() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

if [ ! -f "$OUT/data/pretrain.json" ]; then
    say "synthetic corpus"
    python tools/make_demo_data.py --out "$OUT/data" --train-images 1000 --eval-images 100 --max-objects 1 --centered \
        "$([ "$CAPTIONS" = 1 ] && echo --caption-colors || echo --no-caption-colors)" --tokenizer "$LLM" >/dev/null
fi
if [ ! -f "$OUT/encoder/config.json" ]; then
    say "the demo's SigLIP encoder (features built in: block colours, grid position)"
    python tools/make_demo_encoder.py --out "$OUT/encoder" --config configs/demo_stage1.yaml
fi
if [ ! -f "$OUT/tokenizer/config.json" ]; then
    say "fitting the visual tokenizer (residual k-means, depth 4, 64 codes)"
    python tools/fit_visual_tokenizer.py --images "$OUT/data/images/train" --encoder "$OUT/encoder" \
        --output "$OUT/tokenizer" --depth 4 --codebook-size 64 --appearance-layer 1 --mode resize \
        --head-width 64 --max-images 200 --workers 1 --no-progress
fi
for stage in pretrain:plain:128 instruct:vicuna_v1:384; do
    IFS=: read -r name template length <<< "$stage"
    if [ ! -f "$OUT/shards/$name/manifest.json" ]; then
        say "preprocessing $name ($template)"
        python tools/preprocess.py --data "$name=$OUT/data/$name.json" --image-root "$OUT/data/images" \
            --tokenizer "$OUT/data" --template "$template" --output "$OUT/shards/$name" \
            --max-seq-length "$length" --image-tokens 9 --max-skip-fraction 0.05 --workers "$NPROC" --no-progress
    fi
done
if [ ! -f "$OUT/targets/train/coverage.json" ]; then  # both stages use the same images: one pass
    say "visual targets of the training images (resize)"
    python tools/precompute_targets.py --data "$OUT/data/pretrain.json" "$OUT/data/instruct.json" \
        --image-root "$OUT/data/images" --tokenizer-config "$OUT/tokenizer/config.json" \
        --tokenizer-checkpoint "$OUT/tokenizer/tokenizer.ckpt" --mode resize --precision fp32 \
        --output "$OUT/targets/train" --workers 1 --no-progress >/dev/null
fi

if [ ! -f "$OUT/init/model_config.json" ]; then
    say "import: the demo's pretrained LLM ($LLM) and the demo encoder (tools/convert.py)"
    python tools/convert.py import --llm "$LLM" --vision "$OUT/encoder" --config configs/demo_stage0.yaml \
        --out "$OUT/init" --dtype fp32 --no-progress >/dev/null
fi

[ "${DEMO_PREPARE_ONLY:-0}" = 1 ] && { say "prepared (DEMO_PREPARE_ONLY=1): data, tokenizer, shards, targets, import"; exit 0; }

run=(torchrun --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29500}")
paths=(--set "data.image_root=$OUT/data/images" --set "train.visual_tokenizer=$OUT/tokenizer")
train() {  # stage, then overrides; a finished stage (its `latest` written) is not repeated
    [ -f "$OUT/stage$1/latest" ] && return
    "${run[@]}" tools/train.py --config "configs/demo_stage$1.yaml" "${paths[@]}" --set "train.save_dir=$OUT/stage$1" "${@:2}"
}
say "stage 1: projector + visual head, TP=2, from the import"
train 1 --set "data.shards=$OUT/shards/pretrain" --set "data.targets=$OUT/targets/train" --set "train.load=$OUT/init"
say "stage 2: + LLM, PP=2, from the stage-1 checkpoint"
train 2 --set "data.shards=$OUT/shards/instruct" --set "data.targets=$OUT/targets/train" --set "train.load=$OUT/stage1"
say "held-out questions, greedy answers (DP=2)"
"${run[@]}" tools/evaluate.py --checkpoint "$OUT/stage2" --tokenizer "$OUT/data" --benchmark "jsonl=$OUT/data/eval.jsonl" \
    --image-root "jsonl=$OUT/data/images" --max-new-tokens 6 --out "$OUT/eval"
say "done"
echo "checkpoints: $OUT/stage{1,2}/; held-out results: $OUT/eval/results.json"
echo "logs (TensorBoard): $OUT/stage{1,2}/tensorboard"
