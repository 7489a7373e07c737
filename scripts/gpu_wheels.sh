#!/usr/bin/env bash
# Run HERE (PyPI reachable) before a device call: download into .gpu_wheels/ (git-ignored) the wheels
# the lent GPU machine lacks, for CPython 3.12 on manylinux x86_64, pinned, without dependencies;
# check their requirements against the machine's package list (tools/gpu_check/wheels.py); record
# the commit (the machine's copy of the tree has no .git). Then, through the device tool:
#     run  command: bash scripts/gpu_check.sh   carry: [".gpu_wheels"]
# What travels (working tree + carried paths) must stay under 64 MiB: both sizes are printed.
# $PYTHON picks the interpreter (python3); $DEVICE_KINDS the device tool's KINDS.md (its package list).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu_wheels
PYTHON=${PYTHON:-python3}
PINS=(
    megatron-core==0.16.1       # cp312 wheel; the machine has no megatron
    liger-kernel==0.8.5         # step (c): Triton kernels (torch >= 2.1.2, triton >= 2.3.1: the machine's 2.11 / 3.6)
    cut-cross-entropy==25.1.1   # step (c): Triton kernels
    pydantic==2.14.4            # the config is moving to pydantic v2
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0   # pydantic 2.14 needs >= 4.16; the machine's version is not known
    sentencepiece==0.2.3        # the machine's 0.2.2 aborts training the demo tokenizer (step b's data)
)
rm -rf "$DIR"
mkdir -p "$DIR"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
    platforms+=(--platform "${tag}_x86_64")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DIR" "${PINS[@]}"
"$PYTHON" -m tools.gpu_check.wheels "$DIR" ${DEVICE_KINDS:+--kinds "$DEVICE_KINDS"}
echo "$(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD || echo -dirty)" > "$DIR/COMMIT"
wheels=$(du -sb "$DIR" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) \
    || true  # files deleted but still in the index: du complains, the total stands
echo "$DIR: $(ls "$DIR"/*.whl | wc -l) wheels, $((wheels / 1024)) KiB;" \
    "with the working tree, what travels: $(( (wheels + tree) / 1024 / 1024 )) MiB of 64 MiB"
