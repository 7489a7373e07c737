"""The shard format: tokenized samples in memory-mapped files with O(1) random access.

A shard directory holds ``manifest.json`` (written last: a directory without it is
not a dataset) and, per shard ``shard_NNNNN``, three megatron-core indexed
datasets (``.bin`` + ``.idx``, one sequence per sample) and one table:

- ``shard_NNNNN.tokens``: int32 token ids, ``IMAGE_PLACEHOLDER`` (-200) per image;
- ``shard_NNNNN.loss_mask``: uint8, 1 = supervised;
- ``shard_NNNNN.meta``: UTF-8 JSON per sample: id, image paths, image sizes;
- ``shard_NNNNN.table.npy``: per sample ``num_positions`` (length with images
  expanded), ``num_images`` and ``source`` (index into the manifest's sources).
"""

import json
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_asvr.data.llava import TokenizedSample
from megatron_asvr.tokenizers.templates import IMAGE_PLACEHOLDER

SHARD_MANIFEST = "manifest.json"
FORMAT = "megatron_asvr.llava_shards"
VERSION = 1
_PARTS = {"tokens": np.int32, "loss_mask": np.uint8, "meta": np.uint8}
_TABLE = np.dtype([("num_positions", "<i4"), ("num_images", "<i4"), ("source", "<i4")])


def _shard_prefix(index: int) -> str:
    return f"shard_{index:05d}"


class _OpenShard:
    """The builders of the shard being written."""

    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.builders = {
            part: IndexedDatasetBuilder(f"{prefix}.{part}.bin", dtype=dtype) for part, dtype in _PARTS.items()
        }
        self.rows = []

    def add(self, sample: TokenizedSample, source_index: int) -> None:
        meta = {"id": sample.id, "images": list(sample.images), "image_sizes": [list(s) for s in sample.image_sizes]}
        items = {
            "tokens": sample.input_ids,
            "loss_mask": sample.loss_mask,
            "meta": np.frombuffer(bytearray(json.dumps(meta, ensure_ascii=False).encode("utf-8")), dtype=np.uint8),
        }
        for part, builder in self.builders.items():
            builder.add_item(torch.from_numpy(np.ascontiguousarray(items[part])))
            builder.end_document()
        self.rows.append((sample.num_positions, len(sample.images), source_index))

    def close(self) -> int:
        for part, builder in self.builders.items():
            builder.finalize(f"{self.prefix}.{part}.idx")
        np.save(f"{self.prefix}.table.npy", np.array(self.rows, dtype=_TABLE))
        return len(self.rows)


class ShardWriter:
    """Writes samples in order into shards of ``samples_per_shard``; :meth:`finalize` makes them a dataset."""

    def __init__(self, output_dir: str | Path, samples_per_shard: int = 100_000):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        self.output_dir = Path(output_dir)
        if (self.output_dir / SHARD_MANIFEST).exists():
            raise FileExistsError(f"{self.output_dir} already holds a dataset ({SHARD_MANIFEST}); "
                                  "choose another output")
        if any(self.output_dir.glob("shard_*")):
            raise FileExistsError(
                f"{self.output_dir} holds shard files of an unfinished run; delete them or choose another output"
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.sources: dict[str, int] = {}
        self.shard_sizes: list[int] = []
        self._open: _OpenShard | None = None

    def add(self, sample: TokenizedSample) -> None:
        if self._open is None:
            self._open = _OpenShard(self.output_dir / _shard_prefix(len(self.shard_sizes)))
        self._open.add(sample, self.sources.setdefault(sample.source, len(self.sources)))
        if len(self._open.rows) == self.samples_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        self.shard_sizes.append(self._open.close())
        self._open = None

    def finalize(self, metadata: dict) -> Path:
        """Closes the last shard and writes the manifest (with ``metadata``); returns its path."""
        if self._open is not None:
            self._close_shard()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "num_samples": sum(self.shard_sizes),
            "image_token_index": IMAGE_PLACEHOLDER,
            "sources": list(self.sources),
            "shards": [{"prefix": _shard_prefix(i), "num_samples": n} for i, n in enumerate(self.shard_sizes)],
            "metadata": metadata,
        }
        path = self.output_dir / SHARD_MANIFEST
        path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return path

    def abort(self) -> None:
        """Removes every shard file written so far."""
        if self._open is not None:
            for builder in self._open.builders.values():
                builder.data_file.close()
            self._open = None
        for path in self.output_dir.glob("shard_*"):
            path.unlink()
        self.shard_sizes = []


class ShardDataset:
    """The samples of a shard directory: ``len`` and ``dataset[i] -> TokenizedSample`` in O(1).

    A sample's arrays are copies: megatron's reader unmaps its files when the
    dataset is collected, which would leave views dangling. ``num_positions``,
    ``num_images`` and ``source_ids`` (names in ``sources``) hold every sample's
    length, image count and source, for samplers.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / SHARD_MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path}: no {SHARD_MANIFEST}; not a finished shard directory")
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(
                f"{manifest_path}: format {self.manifest.get('format')!r} "
                f"version {self.manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}"
            )
        self.sources: list[str] = self.manifest["sources"]
        self._shards = []
        tables = []
        for shard in self.manifest["shards"]:
            prefix = str(self.path / shard["prefix"])
            parts = {part: IndexedDataset(f"{prefix}.{part}") for part in _PARTS}
            table = np.load(f"{prefix}.table.npy")
            if any(len(d) != shard["num_samples"] for d in parts.values()) or len(table) != shard["num_samples"]:
                raise ValueError(f"{prefix}: file sizes disagree with the manifest's {shard['num_samples']} samples")
            self._shards.append(parts)
            tables.append(table)
        table = np.concatenate(tables) if tables else np.zeros(0, dtype=_TABLE)
        self.num_positions = table["num_positions"]  # [N]
        self.num_images = table["num_images"]  # [N]
        self.source_ids = table["source"]  # [N]
        self._starts = np.cumsum([0] + [s["num_samples"] for s in self.manifest["shards"]])  # [shards + 1]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> TokenizedSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        index %= len(self)
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        local = index - int(self._starts[shard])
        parts = self._shards[shard]
        meta = json.loads(parts["meta"][local].tobytes().decode("utf-8"))
        return TokenizedSample(
            id=meta["id"],
            source=self.sources[self.source_ids[index]],
            input_ids=parts["tokens"][local].copy(),
            loss_mask=parts["loss_mask"][local].copy(),
            images=tuple(meta["images"]),
            image_sizes=tuple((w, h) for w, h in meta["image_sizes"]),
            num_positions=int(self.num_positions[index]),
        )
