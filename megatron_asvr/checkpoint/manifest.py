"""A checkpoint's files as they were written (``manifest.json``), and whether they still are.

The manifest is the last file written into a checkpoint before the rename that completes it:
the size of every file, and the SHA-256 of every file up to ``HASHED_MAX_BYTES`` (dist
checkpointing's ``.metadata``, ``metadata.json`` and ``common.pt``, the configs, the RNG objects:
what says where each tensor lies and how to read it). A file cut short, lost or grown shows in
its size, a changed description in its hash; checking costs a stat per file and hashing a few
MB, whatever the model. The multi-GB tensor shards are not hashed: at sha256's 1-2 GB/s per core
that would read a 13B run's checkpoint (~180 GB with its optimizer state) once more at every save
and every load, minutes per rank, for the bit flips the storage's own checksums already catch.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional

CHECKPOINT_MANIFEST = "manifest.json"
HASHED_MAX_BYTES = 16 * 2**20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> Dict[str, Path]:
    return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != CHECKPOINT_MANIFEST}


def write_manifest(directory: Path) -> None:
    """Record every file under ``directory`` (sizes; hashes of the small ones), durably."""
    entries = {}
    for name, path in _files(Path(directory)).items():
        size = path.stat().st_size
        entries[name] = {"bytes": size, **({"sha256": _sha256(path)} if size <= HASHED_MAX_BYTES else {})}
    with open(Path(directory) / CHECKPOINT_MANIFEST, "w") as f:
        json.dump({"files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def damage(directory: Path) -> Optional[str]:
    """How ``directory`` differs from its manifest (the first difference), or None. A checkpoint
    written before manifests existed has none and is taken as it is."""
    directory = Path(directory)
    manifest = directory / CHECKPOINT_MANIFEST
    if not manifest.is_file():
        return None
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"{CHECKPOINT_MANIFEST} is unreadable ({err})"
    present = _files(directory)
    for name, entry in recorded.items():
        if name not in present:
            return f"{name} is missing"
        size = present[name].stat().st_size
        if size != entry["bytes"]:
            return f"{name} is {size:,} bytes, {entry['bytes']:,} were written"
        if "sha256" in entry and _sha256(present[name]) != entry["sha256"]:
            return f"{name} changed after it was written (SHA-256 differs)"
    return None
