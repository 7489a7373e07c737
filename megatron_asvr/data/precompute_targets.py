"""The precompute job: the frozen visual tokenizer over every image of LLaVA JSON files, written as a
targets directory (``data.targets`` describes it and reads it).

Resume: a run on a directory that holds a plan checks that the new plan is the same
(else it stops and names what differs) and computes only the images not marked
done. Rows are flushed before their images are marked, so a killed run never leaves
a half-written image marked done.
"""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from megatron_asvr.config.tools import TargetsConfig
from megatron_asvr.data.images import ImageLoadError, image_batches, tile_count
from megatron_asvr.data.llava import DataFileError, RecordError, normalize_image_path, parse_record, read_records
from megatron_asvr.data.targets import DONE_FILE, PLAN_FILE, REPORT_FILE, ZERO_IMAGE, codes_file, file_sha256
from megatron_asvr.runtime import current_device

FORMAT_VERSION = 1
MAX_CODE = np.iinfo(np.uint16).max


class TargetsFailed(RuntimeError):
    """The run cannot go on or its result is refused; the message is one line for the user."""


@dataclass(frozen=True)
class References:
    """The images the records refer to, and the records that could not be read."""

    keys: Tuple[str, ...]  # sorted, unique, normalised relative paths
    records: int
    bad_records: Tuple[dict, ...]  # {"file", "record", "reason"}


def scan_references(data: Sequence[Path]) -> References:
    """Every image path of every record; unreadable records are listed by file and position."""
    keys, bad, records = set(), [], 0
    for path in data:
        for raw in read_records(path):
            records += 1
            where = {"file": raw.file, "record": raw.location}
            if raw.error is not None:
                bad.append({**where, "reason": raw.error})
                continue
            try:
                keys.update(normalize_image_path(p) for p in parse_record(raw.value).images)
            except RecordError as err:
                bad.append({**where, "reason": str(err)})
    return References(tuple(sorted(keys)), records, tuple(bad))


def _image_size(path: Path) -> Tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"{path}: cannot read the image header: {err}") from err


def plan_rows(keys: Sequence[str], image_root: Path, mode: str) -> Tuple[List[list], List[str], List[dict]]:
    """(index [[key, first row, tiles]], missing keys, undecodable [{"image", "error"}]) for the present
    images, then ZERO_IMAGE."""
    index, missing, undecodable, row = [], [], [], 0
    for key in keys:
        path = image_root / key
        if not path.is_file():
            missing.append(key)
            continue
        try:
            tiles = tile_count(*_image_size(path), mode) if mode == "anyres" else 1
        except ImageLoadError as err:
            undecodable.append({"image": key, "error": str(err)})
            continue
        index.append([key, row, tiles])
        row += tiles
    index.append([ZERO_IMAGE, row, 1])
    return index, missing, undecodable


def _write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _first_difference(stored: dict, plan: dict) -> Optional[str]:
    for field in plan:
        if stored.get(field) != plan[field]:
            if field == "index":
                old, new = stored.get("index") or [], plan["index"]
                first = next((n[0] for o, n in zip(old, new) if o != n), (new[len(old):] or old[len(new):])[0][0])
                return f"the image index ({len(old)} planned images, now {len(new)}; first difference at {first!r})"
            return f"{field} ({stored.get(field)!r}, now {plan[field]!r})"
    return None


class TargetStore:
    """The writable output directory: code arrays, done flags and the plan."""

    def __init__(self, directory: Path, plan: dict):
        self.directory, self.plan = directory, plan
        rows = sum(tiles for _, _, tiles in plan["index"])
        exists = (directory / PLAN_FILE).is_file()
        mode = "r+" if exists else "w+"
        self.codes = {
            branch: np.memmap(directory / codes_file(branch), np.uint16, mode,
                            shape=(rows, meta["num_patches"], meta["depth"]))
            for branch, meta in plan["meta"].items()
        }
        self.done = np.memmap(directory / DONE_FILE, np.uint8, mode, shape=(len(plan["index"]),))
        if not exists:  # the plan is written last: without it the next run starts afresh
            self.flush()
            _write_json(directory / PLAN_FILE, plan)

    @classmethod
    def open(cls, directory: Path, plan: dict) -> "TargetStore":
        """Resume the run whose plan is in ``directory``, or start one; refuses a different plan."""
        directory.mkdir(parents=True, exist_ok=True)
        plan = json.loads(json.dumps(plan))  # as it reads back: lists, not tuples
        if (directory / PLAN_FILE).is_file():
            stored = json.loads((directory / PLAN_FILE).read_text())
            difference = _first_difference(stored, plan)
            if difference:
                raise TargetsFailed(f"{directory} holds targets of a different run: {difference} differs; "
                                    "use a new --output directory")
        return cls(directory, plan)

    def write(self, position: int, codes: Dict[str, np.ndarray]) -> None:
        """Put one image's codes (branch -> [tiles, patches, D]) in its rows; not yet marked done."""
        _, first, tiles = self.plan["index"][position]
        for branch, values in codes.items():
            self.codes[branch][first : first + tiles] = values

    def flush(self) -> None:
        for array in self.codes.values():
            array.flush()
        self.done.flush()

    def mark_done(self, positions: Sequence[int]) -> None:
        """Flush the rows, then mark their images done (and flush the marks)."""
        for array in self.codes.values():
            array.flush()
        self.done[list(positions)] = 1
        self.done.flush()


def _check_config(config: TargetsConfig) -> None:
    problems = [f"{p}: data file not found" for p in config.data if not Path(p).is_file()]
    if not config.image_root.is_dir():
        problems.append(f"image root {config.image_root} is not a directory")
    for path in (config.tokenizer_config, config.tokenizer_checkpoint):
        if not Path(path).is_file():
            problems.append(f"{path}: tokenizer file not found")
    if problems:
        raise TargetsFailed("; ".join(problems))


def precompute_targets(config: TargetsConfig) -> dict:
    """Run (or resume) the pass; returns the coverage report, also written to ``coverage.json``.

    Needs ``megatron_asvr.runtime.initialize`` first (the tokenizer's encoder is a
    megatron module). Raises :class:`TargetsFailed` with a one-line reason, after
    writing the report, when missing and undecodable images exceed ``max_missing_fraction``.
    """
    from megatron_asvr.model.specs import resolve_backend
    from megatron_asvr.tokenizers.visual import load_visual_tokenizer
    from megatron_asvr.tokenizers.visual_format import TokenizerFileError

    config.validate()
    _check_config(config)
    started = time.monotonic()
    try:
        references = scan_references(config.data)
    except DataFileError as err:
        raise TargetsFailed(str(err)) from err
    index, missing, undecodable = plan_rows(references.keys, config.image_root, config.mode)
    try:
        tokenizer = load_visual_tokenizer(config.tokenizer_config, config.tokenizer_checkpoint, config.precision,
                                          backend=resolve_backend(config.backend))
    except (TokenizerFileError, ValueError) as err:
        raise TargetsFailed(str(err)) from err
    meta = {branch: tokenizer.metadata(branch) for branch in config.branches}
    largest = max(max(m.codebook_sizes) for m in meta.values())
    if largest > MAX_CODE + 1:
        raise TargetsFailed(f"codebooks of {largest} codes do not fit uint16 targets")
    plan = {
        "version": FORMAT_VERSION,
        "mode": config.mode,
        "precision": config.precision,
        "tokenizer": {"config_sha256": file_sha256(config.tokenizer_config),
                      "checkpoint_sha256": file_sha256(config.tokenizer_checkpoint)},
        "meta": {branch: m.to_json() for branch, m in meta.items()},
        "index": index,
    }
    store = TargetStore.open(config.output_dir, plan)
    pending = [i for i in range(len(index)) if not store.done[i]]
    if config.max_images is not None:
        pending = pending[: config.max_images]
    written, failures = _compute(tokenizer, store, pending, config)
    counts = {"written": written, "failed": len(failures), "seconds": time.monotonic() - started}
    return _report(config, references, index, store, missing, undecodable + failures, counts)


def _compute(tokenizer, store: TargetStore, pending: List[int], config: TargetsConfig) -> Tuple[int, List[dict]]:
    """Code the pending entries batch by batch; returns (entries written, undecodable images)."""
    index = store.plan["index"]
    device = current_device()
    paths = [None if index[i][0] == ZERO_IMAGE else config.image_root / index[i][0] for i in pending]
    written, failures = 0, []
    with tqdm(total=len(pending), unit="img", desc="visual targets", disable=not config.progress) as bar:
        for batch in image_batches(paths, config.mode, config.batch_images, config.workers):
            failures += [{"image": index[pending[j]][0], "error": error} for j, _, error in batch if error]
            decoded = [(pending[j], tiles) for j, tiles, _ in batch if tiles is not None]
            for position, tiles in decoded:
                key, _, planned = index[position]
                if len(tiles) != planned:
                    raise TargetsFailed(f"{key}: {len(tiles)} tiles now, {planned} when planned: the file changed "
                                        "during the run; use a new --output directory")
            if decoded:
                pixels = torch.cat([tiles for _, tiles in decoded]).to(device)  # [T, 3, 384, 384]
                codes = {k: v.to(torch.int32).cpu().numpy().astype(np.uint16)
                         for k, v in tokenizer.codes(pixels, config.branches).items()}  # branch -> [T, P, D]
                row = 0
                for position, tiles in decoded:
                    store.write(position, {k: v[row : row + len(tiles)] for k, v in codes.items()})
                    row += len(tiles)
                store.mark_done([position for position, _ in decoded])
                written += len(decoded)
            bar.update(len(batch))
    return written, failures


def _report(config, references, index, store, missing, undecodable, counts) -> dict:
    images = len(index) - 1  # the last entry is ZERO_IMAGE
    complete = int(store.done[:images].sum())
    report = {
        "records": references.records,
        "unreadable_records": len(references.bad_records),
        "referenced_images": len(references.keys),
        "complete_images": complete,
        "pending_images": images - complete - counts["failed"],
        "zero_image_complete": bool(store.done[images]),
        "missing_images": len(missing),
        "undecodable_images": len(undecodable),
        "written_this_run": counts["written"],
        "seconds": round(counts["seconds"], 3),
        "missing": missing,
        "undecodable": sorted(undecodable, key=lambda item: item["image"]),
        "unreadable": list(references.bad_records),
    }
    report_path = config.output_dir / REPORT_FILE
    _write_json(report_path, report)
    problems = len(missing) + len(undecodable)
    if references.keys and problems / len(references.keys) > config.max_missing_fraction:
        raise TargetsFailed(
            f"{problems} of {len(references.keys)} images missing or undecodable "
            f"({problems / len(references.keys):.2%}), above --max-missing-fraction "
            f"{config.max_missing_fraction:.2%}; see {report_path}"
        )
    return report
