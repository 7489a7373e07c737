"""Streaming safetensors: read tensors one at a time from a (sharded) HF directory, write shards.

HF directories hold ``model.safetensors`` or ``model-0000i-of-0000N.safetensors``
shards listed by ``model.safetensors.index.json`` (``{"weight_map": {name: file}}``).
Pickle checkpoints (``*.bin``, ``*.pt``) are never read.

Shards are written by several ranks at once: each writer names its files by a
stem of its own; ``finalize_shards`` then renames every file to HF's
``model-0000i-of-0000N.safetensors`` and writes the index.
"""

import json
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class SafetensorsDir:
    """The tensors of an HF directory by name, each read when asked for."""

    def __init__(self, directory):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            for name, file in weight_map.items():
                if not (self.directory / file).is_file():
                    raise FileNotFoundError(f"{index}: {name} is in {file}, which does not exist")
            self._file_of = dict(weight_map)
        else:
            self._file_of = self._scan_files()

    def _scan_files(self) -> Dict[str, str]:
        files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in self.directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = f" (found pickle files {pickled}: convert them to safetensors first)" if pickled else ""
            raise FileNotFoundError(f"{self.directory}: no *.safetensors files and no {INDEX_NAME}{hint}")
        if len(files) > 1:
            raise FileNotFoundError(f"{self.directory}: {len(files)} safetensors files but no {INDEX_NAME}")
        with safe_open(str(self.directory / files[0]), framework="pt") as f:
            return {name: files[0] for name in f.keys()}

    def keys(self) -> List[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, copied out of its shard now. The shard is mapped only while it is
        read, so the file's pages do not stay in this process's resident memory."""
        if name not in self._file_of:
            raise KeyError(f"{self.directory}: no tensor {name}")
        path = self.directory / self._file_of[name]
        with safe_open(str(path), framework="pt") as handle:
            if name not in handle.keys():
                raise KeyError(f"{path}: the index lists {name} here but the file lacks it")
            return handle.get_tensor(name)


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class SafetensorsWriter:
    """Buffers tensors and writes a ``{stem}-{k}.safetensors`` file whenever the buffer is full."""

    def __init__(self, directory, stem: str, max_shard_bytes: int):
        self.directory, self.stem, self.max_shard_bytes = Path(directory), stem, max_shard_bytes
        self.weight_map: Dict[str, str] = {}
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffered_bytes = 0
        self._files = 0
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self._buffer:
            raise KeyError(f"tensor {name} written twice")
        size = tensor_bytes(tensor)
        if self._buffer and self._buffered_bytes + size > self.max_shard_bytes:
            self.flush()
        self._buffer[name] = tensor.detach().contiguous()
        self._buffered_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self._buffer:
            return
        file = f"{self.stem}-{self._files:05d}.safetensors"
        save_file(self._buffer, str(self.directory / file), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self._buffer, file))
        self._files += 1
        self._buffer, self._buffered_bytes = {}, 0

    def close(self) -> Dict[str, str]:
        """Write what is buffered; return {tensor name: file}."""
        self.flush()
        return self.weight_map


def finalize_shards(directory, weight_maps: Sequence[Dict[str, str]], total_bytes: int) -> Dict[str, str]:
    """Rename the writers' files to ``model-0000i-of-0000N.safetensors`` (in the order of
    ``weight_maps``, then file name) and write the index; return the final weight map."""
    directory = Path(directory)
    files: List[str] = []
    for weight_map in weight_maps:
        files += sorted(set(weight_map.values()))
    final = {old: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, old in enumerate(files)}
    for old, new in final.items():
        (directory / old).rename(directory / new)
    merged: Dict[str, str] = {}
    for weight_map in weight_maps:
        for name, file in weight_map.items():
            if name in merged:
                raise KeyError(f"tensor {name} written by two writers")
            merged[name] = final[file]
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(merged.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index["weight_map"]
