"""The stamp of a check's results: device, versions, date and the commit it ran.

The commit comes from $GPU_CHECK_COMMIT, else on the device .gpu_wheels/COMMIT (written by
scripts/gpu_wheels.sh: what the device machine has of .git, if anything, is not the tree that
travelled), else ``git rev-parse``.
"""

import datetime
import importlib.metadata
import os
import platform
import subprocess

from tools.gpu_check.step_io import OK, REPO, main

VERSIONS = ("torch", "triton", "transformers", "megatron-core", "liger-kernel", "cut-cross-entropy",
            "transformer-engine")


def commit(cpu: bool) -> str:
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    recorded = REPO / ".gpu_wheels" / "COMMIT"
    if not cpu and recorded.is_file():  # the device's .git, if any, is not the tree that travelled
        return recorded.read_text().strip()
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO).returncode != 0
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):  # no git, or no .git
        return recorded.read_text().strip() if recorded.is_file() else "unknown"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(args) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "status": OK,
        "summary": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": {name: _version(name) for name in VERSIONS},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(args.cpu),
    }


if __name__ == "__main__":
    main(run, __doc__)
