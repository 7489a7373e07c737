"""HF weights -> our checkpoint at any TP / PP. Runs on every rank after ``runtime.initialize``.

Sources: a whole LlavaForConditionalGeneration directory, or a LLaMA / Mistral
causal LM plus a SigLIP / CLIP vision model (the start of stage 1: the projector
is initialised here), or a vision model alone (an LLM trained from scratch, as
the demo's: the LLM of the recipe is initialised here too); the visual head is
initialised here unless an exported one (``convert.visual_head_io``) is given.
Everything is decided from config files and key names first (missing or
unexpected keys are errors that name the key); then each rank builds its own stage and reads only the tensors
it holds, one at a time, and every rank writes its part of the dist checkpoint.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_asvr.checkpoint.directory import HF_VOCAB, TOKENIZER_DIR
from megatron_asvr.checkpoint.model import build_chunks, save_model
from megatron_asvr.config import (
    ConfigError, ModelConfig, ParallelConfig, RunConfig, apply_overrides, from_dict, load_run_config,
)
from megatron_asvr.config.tools import ImportSources
from megatron_asvr.convert.hf_config import llava_from_hf, llm_from_hf, read_config
from megatron_asvr.convert.hf_llava import VISION_TARGET, detect_prefixes, llava_rules, unique_prefix
from megatron_asvr.convert.hf_llm import llm_rules
from megatron_asvr.convert.hf_tokenizer import copy_tokenizer
from megatron_asvr.convert.hf_vocab import HFVocab, appended_vocab
from megatron_asvr.convert.ranks import gather_objects, raise_if_any, require_new_directory
from megatron_asvr.convert.safetensors_io import SafetensorsDir
from megatron_asvr.convert.visual_head_io import head_rules, read_head_config
from megatron_asvr.model.canonical import load_full_state
from megatron_asvr.model.hf_rules import LazyCanonical, TensorRule, check_hf_keys, hf_names
from megatron_asvr.model.hf_vision import find_prefix, is_dropped, vision_from_hf, vision_rules

ROTARY_BUFFER = "rotary_emb.inv_freq"  # derived from rope_theta; some exports still carry it


@dataclass
class ImportPlan:
    """Everything decided before a tensor is read."""

    model: ModelConfig
    vocab: HFVocab  # the vocabulary mapping (written to the checkpoint when it came from llava-hf)
    keep_vocab: bool
    rules: List[TensorRule]
    skipped: List[str]  # HF tensors deliberately not imported
    fresh: Tuple[str, ...]  # canonical name prefixes initialised here
    tokenizer: Optional[Path]
    readers: Dict[str, SafetensorsDir] = field(default_factory=dict)  # HF tensor name -> its directory

    def add_source(self, reader: SafetensorsDir, rules: List[TensorRule]) -> None:
        for name in hf_names(rules):
            if name in self.readers:
                raise ConfigError(f"tensor {name} is in both {self.readers[name].directory} and {reader.directory}")
            self.readers[name] = reader

    def read(self, name: str) -> torch.Tensor:
        return self.readers[name].get(name)


def _default_tokenizer(directory: Path) -> Optional[Path]:
    return directory if any((directory / name).is_file() for name in ("tokenizer.model", "tokenizer.json")) else None


def _plan_llava(directory: Path, base: ModelConfig, tp: int) -> ImportPlan:
    model, vocab = llava_from_hf(read_config(directory), str(directory / "config.json"), base)
    reader = SafetensorsDir(directory)
    prefixes = detect_prefixes(reader.keys(), str(directory))
    rules = llava_rules(model, vocab, tp, prefixes)

    def ignored(key: str) -> bool:
        return key.startswith(prefixes.vision) and is_dropped(key[len(prefixes.vision):], model.vision)

    skipped = check_hf_keys(rules, reader.keys(), str(directory), ignored)
    plan = ImportPlan(model, vocab, True, rules, skipped, ("visual_heads.",), _default_tokenizer(directory))
    plan.add_source(reader, rules)
    return plan


def _plan_separate(llm_dir: Optional[Path], vision_dir: Path, base: ModelConfig, tp: int) -> ImportPlan:
    """A vision model plus an LLM, or without one: then the recipe's LLM is initialised here."""
    llm = base.llm if llm_dir is None else llm_from_hf(read_config(llm_dir), str(llm_dir / "config.json"), base.llm)
    vision = vision_from_hf(read_config(vision_dir), base.vision.feature_layer, str(vision_dir / "config.json"),
                            base.vision)
    model = dataclasses.replace(base, llm=llm, vision=vision)
    vocab = appended_vocab(llm.vocab_size)  # what an export will write; not stored

    vision_reader = SafetensorsDir(vision_dir)
    vprefix = find_prefix(vision_reader.keys())
    rules_vision = vision_rules(vision, vprefix, VISION_TARGET)

    def ignored(key: str) -> bool:  # a SiglipModel / CLIPModel also holds a text tower
        return not key.startswith(vprefix) or is_dropped(key[len(vprefix):], vision)

    skipped = check_hf_keys(rules_vision, vision_reader.keys(), str(vision_dir), ignored)
    fresh = ("projector.", "visual_heads.") + (("language_model.",) if llm_dir is None else ())
    plan = ImportPlan(model, vocab, False, rules_vision, skipped, fresh, None)
    plan.add_source(vision_reader, rules_vision)
    if llm_dir is not None:
        llm_reader = SafetensorsDir(llm_dir)
        prefix = unique_prefix(llm_reader.keys(), "embed_tokens.weight", "the token embedding", str(llm_dir))
        rules_llm = llm_rules(llm, vocab, tp, prefix, "lm_head.weight")
        plan.skipped += check_hf_keys(rules_llm, llm_reader.keys(), str(llm_dir),
                                      lambda key: key.endswith(ROTARY_BUFFER))
        plan.rules = plan.rules + rules_llm
        plan.tokenizer = _default_tokenizer(llm_dir)
        plan.add_source(llm_reader, rules_llm)
    return plan


def plan_import(sources: ImportSources, base: ModelConfig, tensor_parallel: int) -> ImportPlan:
    """Configs, rules and key checks of an import (no tensor is read)."""
    sources.validate()
    if base.asvr.discrete_input:
        raise ConfigError("model.asvr.discrete_input: an HF import builds a model with a vision tower")
    if sources.llava is not None:
        plan = _plan_llava(Path(sources.llava), base, tensor_parallel)
    else:
        llm = None if sources.llm is None else Path(sources.llm)
        plan = _plan_separate(llm, Path(sources.vision), base, tensor_parallel)
    if sources.visual_head is not None:
        head_dir = Path(sources.visual_head)
        asvr = read_head_config(head_dir, plan.model.asvr, plan.model.llm.hidden_size)
        plan.model = dataclasses.replace(plan.model, asvr=asvr)
        head = SafetensorsDir(head_dir)
        rules_head = head_rules(asvr, tensor_parallel)
        check_hf_keys(rules_head, head.keys(), str(head_dir))
        plan.add_source(head, rules_head)
        plan.rules = plan.rules + rules_head
        plan.fresh = tuple(p for p in plan.fresh if p != "visual_heads.")
    if sources.tokenizer is not None:
        plan.tokenizer = Path(sources.tokenizer)
    return plan


def base_model_config(recipe: Optional[Path], overrides: List[str]) -> ModelConfig:
    """The ASVR settings an import starts from: a YAML recipe's model (or the defaults), with
    ``section.key=value`` overrides; its vision and llm sections are replaced by the HF ones."""
    if recipe is not None:
        return load_run_config(recipe, overrides).model
    return from_dict(RunConfig, apply_overrides({}, overrides)).model


def import_hf(
    sources: ImportSources, out_dir, parallel: ParallelConfig, base: ModelConfig, params_dtype: torch.dtype,
    device, progress: bool = True,
) -> Dict[str, Any]:
    """Write the checkpoint of the HF ``sources`` to ``out_dir`` (collective); return a report."""
    require_new_directory(out_dir)
    plan = plan_import(sources, base, parallel.tensor_parallel)
    plan.model.validate(parallel)
    chunks = build_chunks(plan.model, parallel, params_dtype, device)
    rank = dist.get_rank()
    error = None
    with tqdm(desc="import", unit="tensor", disable=not progress or rank != 0) as bar:
        lazy = LazyCanonical(plan.rules, plan.read, on_read=lambda _: bar.update())
        try:
            load_full_state(chunks, lazy, strict=False)
        except (KeyError, ValueError) as err:
            error = f"rank {rank}: {err}"
    unmatched = sorted(n for n in lazy.unmatched if not n.startswith(plan.fresh))
    if unmatched and error is None:
        error = f"rank {rank}: {len(unmatched)} parameters have no HF tensor, e.g. {unmatched[:3]}"
    raise_if_any(error)
    save_model(chunks, out_dir, plan.model)
    copied_tokenizer = []
    if rank == 0 and plan.keep_vocab:
        plan.vocab.write(Path(out_dir) / HF_VOCAB)
    if rank == 0 and plan.tokenizer is not None:
        copied_tokenizer = copy_tokenizer(plan.tokenizer, Path(out_dir) / TOKENIZER_DIR)
    initialised = sorted(set().union(*gather_objects(sorted(lazy.unmatched))))
    dist.barrier()
    return {
        "checkpoint": str(out_dir),
        "model": plan.model,
        "hf_tensors": len(plan.readers),
        "skipped": plan.skipped,
        "initialised": initialised,
        "tokenizer": copied_tokenizer,
        "hf_vocab": plan.vocab if plan.keep_vocab else None,
    }


def _summary(names: List[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)}" + (f" ({shown}{', ...' if len(names) > limit else ''})" if names else "")


def print_import_report(report: Dict[str, Any]) -> None:
    model: ModelConfig = report["model"]
    llm, vision = model.llm, model.vision
    print(f"import: wrote {report['checkpoint']}")
    print(f"  LLM {llm.num_layers} layers x {llm.hidden_size}, {llm.num_attention_heads} heads / {llm.kv_heads} KV, "
          f"vocab {llm.vocab_size}, sliding window {llm.sliding_window}")
    print(f"  vision {vision.family} {vision.layers_used} of {vision.num_layers} layers (feature layer "
          f"{vision.feature_layer}), {vision.num_patches} patches")
    print(f"  HF tensors read: {report['hf_tensors']}; skipped (not built): {_summary(report['skipped'])}")
    print(f"  initialised here (not in the HF weights): {_summary(report['initialised'])}")
    print(f"  llava-hf vocabulary: {report['hf_vocab'] or 'none (export appends <image> and <pad>)'}")
    print(f"  tokenizer: {', '.join(report['tokenizer']) or 'none copied'}", flush=True)
