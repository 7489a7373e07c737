"""Install megatron_asvr.

The csrc extensions are built here against the torch that is already installed:
install with ``pip install --no-build-isolation .`` (build isolation would make pip
fetch a second, multi-GB torch to build with).
"""

from setuptools import find_packages, setup

RUNTIME_DEPS = [
    "torch>=2.6,<3",  # what megatron-core 0.16.1 supports; a cluster's own torch (NGC container) is kept
    "megatron-core==0.16.1",
    "sentencepiece>=0.2.3",  # 0.2.2's BPE trainer aborts on the demo corpus (freq > 0 check)
    "pybind11>=2.12",
    "numpy>=1.26",
    "psutil>=5.9",  # dist_checkpointing's writer hangs without it
    "pyyaml>=6.0",
    "pydantic>=2.6,<3",  # the configuration schema (megatron_asvr/config)
    "safetensors>=0.4",
    "tqdm>=4.66",
    "pillow>=10.0",
    "tokenizers>=0.20",  # HF tokenizer.json text tokenizers
    "tensorboard>=2.16",
    "protobuf>=4",  # sentencepiece model proto edits: Llama tokenization with legacy=False
    "matplotlib>=3.8",  # experiment and attention-map figures
    "pyarrow>=14",  # benchmark files published as HF parquet shards (MMMU, AI2D, RealWorldQA, ...)
]

EXTRAS = {
    # NVIDIA apex is not on PyPI (the `apex` package there is unrelated); build it
    # from https://github.com/NVIDIA/apex if wanted. Nothing here requires it.
    "gpu": ["transformer-engine[pytorch]>=2.1", "flash-attn>=2.6"],
    "wandb": ["wandb>=0.17"],  # train.wandb_project: Weights & Biases beside TensorBoard
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "transformers>=4.46", "protobuf>=4",
            "wandb>=0.17", "ruff>=0.6",
            "nvidia-cuda-cuobjdump>=13.2; platform_system == 'Linux'"],
}


def _extensions():
    """C++/CUDA extensions from csrc/ (see megatron_asvr.kernels for the dispatch).

    The CPU extension is built, and the CUDA one where nvcc and a CUDA
    build of torch are present, for TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
    MEGATRON_ASVR_EXTENSIONS=cpu or =cuda builds that one alone: the GPU check's device build
    (cuda: ~20 s less); CI's install (cpu), which builds the CUDA one beside the tests. Where
    the toolkit has no ``libcudart.so`` link name (pip CUDA wheels ship only
    ``libcudart.so.<major>``), cudart is linked by the full path of the library that
    torch itself loads.
    """
    import glob
    import os
    import shutil

    import torch
    from torch.utils import cpp_extension

    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]  # no-trapping: lets float->int vectorise
    which = os.environ.get("MEGATRON_ASVR_EXTENSIONS", "all")
    if which not in ("all", "cpu", "cuda"):
        raise RuntimeError(f"setup.py: MEGATRON_ASVR_EXTENSIONS={which!r}: expected all, cpu or cuda")
    modules = [] if which == "cuda" else [
        cpp_extension.CppExtension(
            "megatron_asvr._fused_ce_cpu",
            ["csrc/fused_ce_cpu.cpp"],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]
    if which != "cpu" and torch.version.cuda and shutil.which("nvcc"):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cuda = cpp_extension.CUDAExtension(
            "megatron_asvr._fused_ce_cuda",
            ["csrc/fused_ce_cuda_bindings.cpp", "csrc/fused_ce_cuda.cu"],
            # --threads 0: each architecture of TORCH_CUDA_ARCH_LIST compiled in parallel (one per CPU)
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--threads", "0"]},
        )
        toolkit_libs = [os.path.join(cpp_extension.CUDA_HOME or "", d) for d in ("lib64", "lib")]
        if not any(os.path.exists(os.path.join(d, "libcudart.so")) for d in toolkit_libs):
            major = torch.version.cuda.split(".")[0]
            site = os.path.dirname(os.path.dirname(torch.__file__))
            found = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", f"libcudart.so.{major}")))
            if not found:
                raise RuntimeError(
                    f"setup.py: nvcc found but no libcudart.so in {toolkit_libs} and no pip "
                    f"libcudart.so.{major} under {site}/nvidia; set CUDA_HOME to a CUDA {major} toolkit"
                )
            cuda.libraries.remove("cudart")
            cuda.extra_link_args.append(found[0])
        modules.append(cuda)
    return modules, {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="megatron_asvr",
    version="0.1.0",
    description="Megatron-core 3D-parallel trainer for LLaVA-style VLMs with ASVR",
    packages=find_packages(include=["megatron_asvr", "megatron_asvr.*"]),  # the library alone: not tests/, demo/
    python_requires=">=3.11",
    install_requires=RUNTIME_DEPS,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
