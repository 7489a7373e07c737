"""A whole HF LlavaForConditionalGeneration <-> our ASVRModel (vision encoder, projector, LLM).

Key layouts read: llava-hf's hub files (``vision_tower.vision_model.*``,
``multi_modal_projector.*``, ``language_model.model.*``,
``language_model.lm_head.weight``), what transformers 5 saves (the vision
tower without ``vision_model.``) and transformers 5's in-memory names
(``model.vision_tower.*``, ``model.language_model.*``, ``lm_head.weight``):
each part's prefix is found from one anchor key. Export writes the hub layout,
which transformers 4.x and 5.x and vLLM all load.

The vision tower: we build only the layers that feed the feature layer. An
export that is given the original HF vision weights copies the dropped tail
layers and the post-layernorm from them and keeps LLaVA's
``vision_feature_layer``; without them it writes the truncated tower with
``vision_feature_layer=-1`` (the same features: ``hidden_states[-1]`` comes
before the post-layernorm) and an identity post-layernorm (ones and zeros), which
LLaVA never applies. The visual head is not part of the HF model
(``convert.visual_head_io``).
"""

import dataclasses
from dataclasses import dataclass
from typing import Iterable, List

from megatron_asvr.config import ModelConfig, VisionConfig
from megatron_asvr.convert.hf_llm import llm_rules
from megatron_asvr.convert.hf_vocab import HFVocab
from megatron_asvr.model.hf_rules import TensorRule, hf_names, same
from megatron_asvr.model.hf_vision import find_prefix, vision_rules

PROJECTOR_MAP = {
    "projector.encoder.linear_fc1": "linear_1",
    "projector.encoder.linear_fc2": "linear_2",
}
VISION_TARGET = "vision_encoder."


@dataclass(frozen=True)
class LlavaPrefixes:
    """Where each part's HF names start in one key layout."""

    vision: str
    projector: str
    llm: str
    lm_head: str  # the full name of the LM head weight


HUB = LlavaPrefixes("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
                    "language_model.lm_head.weight")


def unique_prefix(keys: List[str], suffix: str, what: str, where: str) -> str:
    """What precedes ``suffix`` in the one key that ends with it."""
    found = [key[: -len(suffix)] for key in keys if key.endswith(suffix)]
    if len(found) != 1:
        raise KeyError(f"{where}: expected one '*{suffix}' key ({what}), found {len(found)}")
    return found[0]


def detect_prefixes(keys: Iterable[str], where: str) -> LlavaPrefixes:
    """The prefixes of the layout ``keys`` are in (one anchor key per part)."""
    keys = list(keys)
    projector = unique_prefix(keys, "multi_modal_projector.linear_1.weight", "the projector", where)
    return LlavaPrefixes(
        vision=find_prefix(keys),
        projector=projector + "multi_modal_projector.",
        llm=unique_prefix(keys, "embed_tokens.weight", "the token embedding", where),
        lm_head=unique_prefix(keys, "lm_head.weight", "the LM head", where) + "lm_head.weight",
    )


def projector_rules(hf_prefix: str) -> List[TensorRule]:
    return [
        same(f"{ours}.{param}", f"{hf_prefix}{theirs}.{param}")
        for ours, theirs in PROJECTOR_MAP.items()
        for param in ("weight", "bias")
    ]


def llava_rules(model: ModelConfig, vocab: HFVocab, tensor_parallel: int, prefixes: LlavaPrefixes) -> List[TensorRule]:
    """Every tensor of the HF model that we build, in the layout ``prefixes`` names."""
    return (
        vision_rules(model.vision, prefixes.vision, VISION_TARGET)
        + projector_rules(prefixes.projector)
        + llm_rules(model.llm, vocab, tensor_parallel, prefixes.llm, prefixes.lm_head)
    )


def vision_tail_names(vision: VisionConfig, prefix: str) -> List[str]:
    """The HF vision tensors after our feature layer: the later layers and the post-layernorm."""
    whole = dataclasses.replace(vision, feature_layer=vision.num_layers)  # every layer
    kept = set(hf_names(vision_rules(vision, prefix)))
    tail = [name for name in hf_names(vision_rules(whole, prefix)) if name not in kept]
    return tail + [f"{prefix}post_layernorm.weight", f"{prefix}post_layernorm.bias"]
