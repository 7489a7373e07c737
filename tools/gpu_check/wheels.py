"""Check the wheels that travel to the GPU machine: one version each, and every requirement met there.

    python3 -m tools.gpu_check.wheels .gpu_wheels [--kinds /work/.library/device/KINDS.md]

Each wheel's Requires-Dist (extras left out, environment markers evaluated for CPython 3.12 on
Linux x86_64) must name a package the machine already has (KINDS.md, "Python packages already there")
or another wheel in the folder: they are installed with --no-deps. Versions there are not listed, so
only names are checked. Exits 1 naming what is missing. Run by scripts/gpu_wheels.sh.
"""

import argparse
import re
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Set

try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement

DEVICE_ENVIRONMENT = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                      "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                      "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def machine_packages(kinds: Path) -> Set[str]:
    """The package names of KINDS.md's "Python packages already there" section."""
    section = kinds.read_text().split("## Python packages already there", 1)[-1]
    match = re.search(r"Packages: (.*?)\.\s*$", section, re.S | re.M)
    if match is None:
        raise SystemExit(f"wheels: no package list found in {kinds}")
    return {normalize(name) for name in match.group(1).replace("\n", " ").split(", ")}


def wheel_requirements(folder: Path) -> Dict[str, List[str]]:
    """Distribution name -> the names it requires on the device machine."""
    out = {}
    for wheel in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            lines = archive.read(metadata).decode().splitlines()
        name = normalize(next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Name:")))
        if name in out:
            raise SystemExit(f"wheels: two versions of {name} in {folder}: keep one (two stop the install)")
        requirements = [Requirement(line.split(":", 1)[1].strip())
                        for line in lines if line.startswith("Requires-Dist:")]
        out[name] = [normalize(r.name) for r in requirements
                     if r.marker is None or r.marker.evaluate(DEVICE_ENVIRONMENT)]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--kinds", type=Path, default=Path("/work/.library/device/KINDS.md"))
    args = parser.parse_args(argv)
    wheels = wheel_requirements(args.folder)
    if not args.kinds.is_file():
        print(f"wheels: {args.kinds} not found: requirements not checked against the machine's packages")
        return 0
    there = machine_packages(args.kinds)
    missing = []
    for name, needs in wheels.items():
        marks = [f"{n} ({'wheel' if n in wheels else 'machine' if n in there else 'MISSING'})" for n in needs]
        print(f"  {name}: {', '.join(marks) or 'no requirements'}")
        missing += [f"{n} (for {name})" for n in needs if n not in wheels and n not in there]
    if missing:
        print("wheels: missing on the device machine, add their wheels: " + ", ".join(missing), file=sys.stderr)
        return 1
    print(f"wheels: every requirement of the {len(wheels)} wheels is on the machine or among the wheels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
