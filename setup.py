"""Install megatron_asvr.

The csrc extensions are built here against the torch that is already installed:
install with ``pip install --no-build-isolation .`` (build isolation would make pip
fetch a second, multi-GB torch to build with).
"""

from setuptools import find_packages, setup

RUNTIME_DEPS = [
    "torch==2.14.1",
    "megatron-core==0.16.1",
    "sentencepiece>=0.2",
    "pybind11>=2.12",
    "numpy>=1.26",
    "psutil>=5.9",  # dist_checkpointing's writer hangs without it
    "pyyaml>=6.0",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "pillow>=10.0",
    "tokenizers>=0.20",  # HF tokenizer.json text tokenizers
    "protobuf>=4",  # sentencepiece model proto edits: Llama tokenization with legacy=False
]

EXTRAS = {
    # NVIDIA apex is not on PyPI (the `apex` package there is unrelated); build it
    # from https://github.com/NVIDIA/apex if wanted. Nothing here requires it.
    "gpu": ["transformer-engine[pytorch]>=2.1", "flash-attn>=2.6"],
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.46", "protobuf>=4"],
}


def _extensions():
    """C++/CUDA extensions from csrc/ (see megatron_asvr.kernels for the dispatch)."""
    return [], {}


ext_modules, cmdclass = _extensions()

setup(
    name="megatron_asvr",
    version="0.1.0",
    description="Megatron-core 3D-parallel trainer for LLaVA-style VLMs with ASVR",
    packages=find_packages(include=["megatron_asvr", "megatron_asvr.*"]),
    python_requires=">=3.11",
    install_requires=RUNTIME_DEPS,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
