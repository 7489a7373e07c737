"""Our checkpoint (saved at any TP / PP) -> an HF LlavaForConditionalGeneration directory, or
with ``llm_only`` its language model alone as an HF LlamaForCausalLM / MistralForCausalLM
(config.json, generation_config.json, safetensors, the tokenizer copied as it is).

Runs on every rank of a TP x PP layout after ``runtime.initialize``. Output::

    out/config.json, generation_config.json
    out/model-0000i-of-0000N.safetensors, model.safetensors.index.json   (llava-hf hub key layout)
    out/tokenizer files with <image> and <pad>, preprocessor_config.json, processor_config.json
    out/visual_head/config.json, model-*.safetensors, index   (convert.visual_head_io)

Memory: each parameter is gathered over its TP group on its own, split into its
HF tensors and handed to its pipeline stage's writer (TP rank 0), which writes
a shard whenever ``max_shard_bytes`` are buffered. A rank holds its own shard of
the model, one gathered tensor and one shard buffer: never a second full copy.
The vision tower is written as ``convert.hf_llava`` describes (complete with
``vision_tower_from``, truncated without).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_asvr.checkpoint.directory import TOKENIZER_DIR, resolve
from megatron_asvr.checkpoint.model import load_model, read_model_config
from megatron_asvr.config import ConfigError, ModelConfig, ParallelConfig
from megatron_asvr.config.tools import ExportOptions
from megatron_asvr.convert.hf_config import check_same_vision, llava_to_hf, llm_to_hf, read_config
from megatron_asvr.convert.hf_llava import HUB, llava_rules, vision_tail_names
from megatron_asvr.convert.hf_llm import llm_rules
from megatron_asvr.convert.hf_tokenizer import copy_tokenizer, write_processor, write_tokenizer
from megatron_asvr.convert.hf_vocab import HFVocab, appended_vocab, bare_vocab, checkpoint_vocab
from megatron_asvr.convert.ranks import gather_objects, is_writer, raise_if_any, require_new_directory
from megatron_asvr.convert.safetensors_io import SafetensorsDir, SafetensorsWriter, finalize_shards
from megatron_asvr.convert.visual_head_io import PREFIX as HEAD_PREFIX
from megatron_asvr.convert.visual_head_io import head_rules, write_head_config
from megatron_asvr.model.canonical import full_state
from megatron_asvr.model.hf_rules import by_ours, hf_names
from megatron_asvr.model.hf_vision import find_prefix, vision_from_hf
from megatron_asvr.runtime.device import dtype_of

HEAD_DIR = "visual_head"
LLM_PREFIX = "language_model."  # our names of the language model's parameters
def hf_dtype_name(precision: str) -> str:
    """An HF config's ``torch_dtype`` for our precision name: ``bf16`` -> ``bfloat16``."""
    return str(dtype_of(precision)).removeprefix("torch.")


class _OneParameter:
    """A model chunk seen through one of its parameters: ``full_state`` of it gathers just that one."""

    def __init__(self, chunk: torch.nn.Module, name: str, param: torch.nn.Parameter):
        self._chunk, self._name, self._param = chunk, name, param

    def named_modules(self):
        return self._chunk.named_modules()

    def named_parameters(self):
        return iter([(self._name, self._param)])


def iter_full_tensors(chunks) -> Iterator[Tuple[str, torch.Tensor]]:
    """(canonical name, full tensor) of this rank's parameters, one at a time (collective over TP)."""
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            yield from full_state([_OneParameter(chunk, name, param)]).items()


@dataclass
class VisionTail:
    """The HF tensors after our feature layer, from the original vision weights."""

    reader: SafetensorsDir
    names: List[Tuple[str, str]]  # (name in the source, name in the export)

    @classmethod
    def find(cls, directory: Path, model: ModelConfig) -> "VisionTail":
        config = read_config(directory)
        vision_config = config["vision_config"] if config.get("model_type") == "llava" else config
        theirs = vision_from_hf(vision_config, model.vision.feature_layer, str(directory / "config.json"))
        check_same_vision(model.vision, theirs, str(directory / "config.json"))
        reader = SafetensorsDir(directory)
        source = vision_tail_names(model.vision, find_prefix(reader.keys()))
        missing = [name for name in source if name not in reader]
        if missing:
            raise KeyError(f"{directory}: missing tensor {missing[0]} ({len(missing)} missing in all)")
        return cls(reader, list(zip(source, vision_tail_names(model.vision, HUB.vision), strict=True)))

    def write(self, writer: SafetensorsWriter, dtype: torch.dtype) -> None:
        for source, target in self.names:
            writer.add(target, self.reader.get(source).to(dtype))


def _identity_post_layernorm(writer: SafetensorsWriter, width: int, dtype: torch.dtype) -> None:
    writer.add(f"{HUB.vision}post_layernorm.weight", torch.ones(width, dtype=dtype))
    writer.add(f"{HUB.vision}post_layernorm.bias", torch.zeros(width, dtype=dtype))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_llm_configs(out: Path, model: ModelConfig, vocab: HFVocab, options: ExportOptions,
                       tokenizer: Optional[Path]) -> List[str]:
    _write_json(out / "config.json", llm_to_hf(model.llm, vocab, hf_dtype_name(options.dtype)))
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "_from_model_config": True})
    return ["config.json", "generation_config.json"] + (copy_tokenizer(tokenizer, out) if tokenizer else [])


def _write_configs(out: Path, model: ModelConfig, vocab: HFVocab, complete_tower: bool, options: ExportOptions,
                   tokenizer: Optional[Path]) -> List[str]:
    if options.llm_only:
        return _write_llm_configs(out, model, vocab, options, tokenizer)
    vision_layers = model.vision.num_layers if complete_tower else model.vision.layers_used
    feature_layer = model.vision.feature_layer if complete_tower else -1
    config = llava_to_hf(model, vocab, vision_layers, feature_layer, hf_dtype_name(options.dtype))
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": vocab.pad_token_id, "_from_model_config": True,
    })
    written = ["config.json", "generation_config.json"]
    if tokenizer is not None:
        written += write_tokenizer(tokenizer, out, vocab, model.llm.max_sequence_length)
        write_processor(out, model.vision)
        written += ["preprocessor_config.json", "processor_config.json"]
    if model.asvr.branches:
        write_head_config(out / HEAD_DIR, model.asvr, model.llm.hidden_size)
    return written


def _expected_names(rules, tail: Optional[VisionTail], llm_only: bool) -> set:
    if llm_only:
        return set(hf_names(rules))
    names = set(hf_names(rules)) | {f"{HUB.vision}post_layernorm.weight", f"{HUB.vision}post_layernorm.bias"}
    return names | {target for _, target in (tail.names if tail else [])}


def _finalize(out: Path, written: List[Dict[str, Tuple[dict, int]]], expected: set, has_head: bool) -> None:
    """Name the shards, write the indexes, and check the export holds exactly ``expected``.

    ``written``: per rank, {"model" | "head": (its writer's weight map, bytes)}.
    """
    def merged(part: str, directory: Path) -> Dict[str, str]:
        return finalize_shards(directory, [w[part][0] for w in written], sum(w[part][1] for w in written))

    weight_map = merged("model", out)
    if set(weight_map) != expected:
        missing, extra = sorted(expected - set(weight_map)), sorted(set(weight_map) - expected)
        raise KeyError(f"{out}: the export is missing {missing[:3]} and has unexpected {extra[:3]}")
    if has_head:
        merged("head", out / HEAD_DIR)
    else:
        (out / HEAD_DIR).rmdir()


def export_hf(checkpoint, out_dir, parallel: ParallelConfig, options: ExportOptions, device) -> Dict[str, Any]:
    """Write the HF directory of ``checkpoint`` (a checkpoint, or a save directory: its newest) to
    ``out_dir`` (collective); return a report."""
    checkpoint, out = resolve(Path(checkpoint)), Path(out_dir)
    require_new_directory(out)
    model = read_model_config(checkpoint)
    if model.asvr.discrete_input:
        raise ConfigError(f"{checkpoint}: a discrete-input model has no vision tower; LLaVA needs one")
    model.validate(parallel)
    llm_only = options.llm_only
    if llm_only:
        vocab = bare_vocab(model.llm.vocab_size)
    else:
        vocab = checkpoint_vocab(checkpoint) or appended_vocab(model.llm.vocab_size)
    vocab.validate(model.llm.vocab_size, str(checkpoint))
    tail = VisionTail.find(Path(options.vision_tower_from), model) if options.vision_tower_from else None
    if llm_only and tail is not None:
        raise ConfigError("an LLM-only export has no vision tower: drop --vision-tower-from")
    tokenizer = Path(options.tokenizer) if options.tokenizer else checkpoint / TOKENIZER_DIR
    tokenizer = tokenizer if tokenizer.exists() else None
    dtype = dtype_of(options.dtype)
    tp = parallel.tensor_parallel
    rules = llm_rules(model.llm, vocab, tp) if llm_only else llava_rules(model, vocab, tp, HUB)
    hf_rules, head = by_ours(rules), by_ours(head_rules(model.asvr, tp))

    rank = dist.get_rank()
    if rank == 0:
        (out / HEAD_DIR).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    chunks = load_model(checkpoint, model, parallel, dtype, device)

    writer = is_writer()
    writers = {"model": SafetensorsWriter(out, f"rank{rank:05d}", options.max_shard_bytes),
               "head": SafetensorsWriter(out / HEAD_DIR, f"rank{rank:05d}", options.max_shard_bytes)}
    unmatched = []
    total = sum(1 for chunk in chunks for _ in chunk.parameters())
    with torch.no_grad(), tqdm(total=total, desc="export", unit="tensor", disable=not options.progress or rank) as bar:
        for name, tensor in iter_full_tensors(chunks):
            bar.update()
            if not writer or (llm_only and not name.startswith(LLM_PREFIX)):
                continue
            part = "head" if name.startswith(HEAD_PREFIX) else "model"
            rule = (head if part == "head" else hf_rules).get(name)
            if rule is None:
                unmatched.append(name)
                continue
            for hf_name, value in zip(rule.hf, rule.to_hf(tensor), strict=True):
                writers[part].add(hf_name, value.to(dtype))
        if writer and not llm_only and parallel_state.is_pipeline_first_stage(ignore_virtual=True):
            if tail is not None:
                tail.write(writers["model"], dtype)
            else:
                _identity_post_layernorm(writers["model"], model.vision.hidden_size, dtype)
    raise_if_any(f"rank {rank}: no HF name for {unmatched[:3]} ({len(unmatched)} in all)" if unmatched else None)

    written = gather_objects({part: (w.close(), w.total_bytes) for part, w in writers.items()})
    files, error = [], None
    if rank == 0:
        try:
            _finalize(out, written, _expected_names(hf_rules.values(), tail, llm_only),
                      model.asvr.branches and not llm_only)
            files = _write_configs(out, model, vocab, tail is not None, options, tokenizer)
        except (KeyError, ConfigError, OSError) as err:
            error = f"rank 0: {err}"
    raise_if_any(error)
    dist.barrier()
    return {
        "out": str(out),
        "tensors": sum(len(w["model"][0]) for w in written),
        "head_tensors": sum(len(w["head"][0]) for w in written),
        "vision_tower": "none (LLM only)" if llm_only else (
            f"complete ({model.vision.num_layers} layers, vision_feature_layer={model.vision.feature_layer})"
            if tail is not None else
            f"truncated to the {model.vision.layers_used} layers we keep (vision_feature_layer=-1; "
            f"pass --vision-tower-from for the complete tower)"
        ),
        "vocab": vocab,
        "tokenizer": str(tokenizer) if tokenizer else None,
        "files": files,
    }


def print_export_report(report: Dict[str, Any]) -> None:
    vocab: HFVocab = report["vocab"]
    print(f"export: wrote {report['out']}: {report['tensors']} tensors, visual head {report['head_tensors']} tensors")
    print(f"  vision tower: {report['vision_tower']}")
    if vocab.image_token_index is None:
        print(f"  vocabulary: {vocab.rows} rows (the LM's own)")
    else:
        print(f"  vocabulary: {vocab.rows} rows, <image> = {vocab.image_token_index}, <pad> = {vocab.pad_token_id}")
    print(f"  tokenizer: {report['tokenizer'] or 'none written (pass --tokenizer)'}", flush=True)
