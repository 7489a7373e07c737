"""Precomputed visual targets, as the loader reads them: the frozen visual tokenizer's codes of
every image, by image key (the image path relative to the image root, as the shards store it).

The tokenizer is frozen, so an image's codes never change: they are computed once
(``data.precompute_targets``, batched, on the GPU when there is one). A targets directory::

    targets.json       the plan: mode, precision, code branches with their metadata
                       (VisualCodesMeta), SHA-256 of the tokenizer's config and
                       checkpoint, and the index [[key, first row, tiles], ...]
    codes_<branch>.u16   uint16 [rows, patches, D], memory-mapped; an image owns rows
                       first .. first + tiles - 1 (one per 384 x 384 tile: 1 for
                       resize / pad, 1 + grid tiles for anyres), so [images, 729 x tiles, D]
    done.u8            uint8 [entries] in index order, 1 once the entry's rows are on disk; the
                       last entry is ZERO_IMAGE, the blank tile of supervised text-only samples
    coverage.json      the last run's report: records read, images referenced / complete /
                       pending, missing and undecodable images by name, unreadable records
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_asvr.config import ConfigError
from megatron_asvr.data.llava import normalize_image_path
from megatron_asvr.tokenizers.visual_format import VisualCodesMeta

# Key of the all-zero tile (mid-gray once normalised) that text-only samples get when they
# are supervised, as the released code feeds them; always planned last, one tile.
ZERO_IMAGE = "<zero-image>"
PLAN_FILE = "targets.json"
DONE_FILE = "done.u8"
REPORT_FILE = "coverage.json"


def codes_file(branch: str) -> str:
    return f"codes_{branch}.u16"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


class VisualTargets:
    """Read-only view of a targets directory: the codes of an image by its key."""

    @staticmethod
    def check_made_with(directory: Optional[str], tokenizer_config: Path, tokenizer_checkpoint: Path,
                        image_mode: str) -> None:
        """Raise ``ConfigError`` unless the targets in ``directory`` (None: a run without targets) were
        computed with this tokenizer (its files' SHA-256, as the plan records them) and image mode."""
        if directory is None:
            return
        plan_path = Path(directory) / PLAN_FILE
        plan = json.loads(plan_path.read_text())
        recorded = plan.get("tokenizer") or {}
        if "mode" not in plan or not {"config_sha256", "checkpoint_sha256"} <= recorded.keys():
            raise ConfigError(f"{plan_path} records no tokenizer or image mode: recompute the targets with "
                              f"tools/precompute_targets.py")
        if plan["mode"] != image_mode:
            raise ConfigError(
                f"{plan_path} holds codes of {plan['mode']!r} images but data.image_mode={image_mode!r}: set "
                f"data.image_mode={plan['mode']} or recompute the targets with --mode {image_mode}"
            )
        for part, path in (("config", tokenizer_config), ("checkpoint", tokenizer_checkpoint)):
            digest = file_sha256(Path(path))
            if digest != recorded[f"{part}_sha256"]:
                raise ConfigError(
                    f"{plan_path} was computed with another visual tokenizer ({path} has SHA-256 {digest[:12]}..., "
                    f"the targets record {part} {recorded[f'{part}_sha256'][:12]}...): point train.visual_tokenizer "
                    f"at the tokenizer the targets were made with, or recompute them with this one"
                )

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        plan_path = self.directory / PLAN_FILE
        if not plan_path.is_file():
            raise FileNotFoundError(f"{self.directory}: no {PLAN_FILE}; run tools/precompute_targets.py first")
        plan = json.loads(plan_path.read_text())
        self.mode = plan["mode"]
        self.meta = {branch: VisualCodesMeta.from_json(m) for branch, m in plan["meta"].items()}
        self._rows = {key: (position, first, tiles) for position, (key, first, tiles) in enumerate(plan["index"])}
        rows = sum(tiles for _, _, tiles in plan["index"])
        self._codes = {branch: np.memmap(self.directory / codes_file(branch), np.uint16, "r",
                                       shape=(rows, m.num_patches, m.depth)) for branch, m in self.meta.items()}
        self._done = np.memmap(self.directory / DONE_FILE, np.uint8, "r", shape=(len(plan["index"]),))

    def __contains__(self, key: str) -> bool:
        entry = self._rows.get(normalize_image_path(key))
        return entry is not None and bool(self._done[entry[0]])

    def __len__(self) -> int:
        """Entries complete, ZERO_IMAGE included."""
        return int(self._done.sum())

    def codes(self, key: str, branch: str = "semantic") -> np.ndarray:
        """uint16 [tiles * patches, D] of image ``key`` (a path relative to the image root)."""
        if branch not in self._codes:
            raise KeyError(f"{self.directory} holds {sorted(self._codes)} codes, not {branch!r}")
        entry = self._rows.get(normalize_image_path(key))
        if entry is None or not self._done[entry[0]]:
            state = "not in the index" if entry is None else "not computed yet (resume the precompute run)"
            raise KeyError(f"{self.directory}: image {key!r} is {state}")
        _, first, tiles = entry
        array = self._codes[branch][first : first + tiles]  # [tiles, P, D]
        return array.reshape(-1, array.shape[-1])
