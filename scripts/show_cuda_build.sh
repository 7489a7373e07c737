#!/usr/bin/env bash
# Show the CUDA extension built from csrc/: its library path and the GPU architectures
# embedded in it (cuobjdump --list-elf). Fails when nvcc is on PATH but the extension
# was not built, or lacks an architecture of TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
# Run after the package is installed (source scripts/env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null; then
    echo "show_cuda_build: nvcc not on PATH: no CUDA extension is built on this machine"
    exit 0
fi
# find_spec locates the library without loading it (loading needs no GPU, but no need).
lib=$(python -c "import importlib.util as u; s = u.find_spec('megatron_asvr._fused_ce_cuda'); print(s.origin if s else '')")
if [ -z "$lib" ]; then
    echo "show_cuda_build: nvcc is on PATH but megatron_asvr._fused_ce_cuda was not built" >&2
    exit 1
fi
cuobjdump=$(command -v cuobjdump || python -c "
import glob, nvidia
print(next(iter(sorted(p for d in nvidia.__path__ for p in glob.glob(d + '/*/bin/cuobjdump'))), ''))")
if [ -z "$cuobjdump" ]; then
    echo "show_cuda_build: no cuobjdump (install the dev extras: nvidia-cuda-cuobjdump)" >&2
    exit 1
fi
echo "CUDA extension: $lib ($(du -h "$lib" | cut -f1))"
elves=$("$cuobjdump" --list-elf "$lib")
echo "$elves"
for arch in $(echo "${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" | tr ';, ' '\n\n\n' | sed 's/+PTX//'); do
    sm="sm_${arch/./}"
    if ! grep -q "\.${sm}\.cubin" <<<"$elves"; then
        echo "show_cuda_build: $lib holds no $sm code (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0})" >&2
        exit 1
    fi
done
