"""HF SiglipVisionModel / CLIPVisionModel <-> our VisionEncoder: config fields and weights.

The state-dict adapter of the vision tower, beside the model it adapts: used by the
LLaVA converters (convert/) and by the visual tokenizer's encoder (tokenizers/).
``vision_from_hf`` / ``vision_to_hf`` map HF vision config dicts to our VisionConfig
and back (unsupported fields are a ``ConfigError`` naming the file and key).
Weights -> canonical names (``hf_vision_to_canonical``) are strict: a
missing weight is an error naming it; keys that are not part of the model are
an error too, except the ones a feature-layer encoder deliberately drops
(later layers, the post-norm, SigLIP's pooling head), which are returned as
``skipped``. ``vision_rules`` is the same mapping as per-tensor rules, for the
streaming LLaVA converters (both directions).
"""

import dataclasses
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron_asvr.config import ConfigError, VisionConfig
from megatron_asvr.model.hf_rules import TensorRule, fused_qkv, hf_names, reshaped, same

_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_LAYER_MAP = {
    "layer_norm1": "input_layernorm",
    "self_attn.out_proj": "self_attention.linear_proj",
    "layer_norm2": "pre_mlp_layernorm",
    "mlp.fc1": "mlp.linear_fc1",
    "mlp.fc2": "mlp.linear_fc2",
}
VISION_TYPES = {"siglip_vision_model": "siglip", "clip_vision_model": "clip", "siglip": "siglip", "clip": "clip"}
VISION_ACT = {"siglip": "gelu_pytorch_tanh", "clip": "quick_gelu"}
OUR_VISION_ACT = {"siglip": "gelu_tanh", "clip": "quick_gelu"}


_ANCHOR = "embeddings.patch_embedding.weight"


def find_prefix(keys) -> str:
    """What precedes the vision model's own key names: ``""`` (an in-memory transformers 5
    model), ``vision_model.`` (hub files), ``siglip_model.vision_model.`` (DualToken), ..."""
    prefixes = [key[: -len(_ANCHOR)] for key in keys if key.endswith(_ANCHOR)]
    if len(prefixes) != 1:
        raise KeyError(f"expected one '*{_ANCHOR}' key in the HF vision weights, found {len(prefixes)}")
    return prefixes[0]


def vision_rules(vision: VisionConfig, source_prefix: str, target_prefix: str = "") -> List[TensorRule]:
    """The rules between HF vision weights under ``source_prefix`` and our encoder's canonical
    names under ``target_prefix``, for the ``vision.layers_used`` layers we build."""
    s, t = source_prefix, target_prefix + "vit."
    rules = [same(t + "conv1.weight", s + "embeddings.patch_embedding.weight")]
    if vision.family == "siglip":
        rules.append(same(t + "conv1.bias", s + "embeddings.patch_embedding.bias"))
    else:
        width = vision.hidden_size
        rules += [
            reshaped(t + "class_token", s + "embeddings.class_embedding", (1, 1, width), (width,)),
            same(t + "ln_pre.weight", s + "pre_layrnorm.weight"),
            same(t + "ln_pre.bias", s + "pre_layrnorm.bias"),
        ]
    rules.append(same(t + "position_embeddings.weight", s + "embeddings.position_embedding.weight"))
    for i in range(vision.layers_used):
        layer, ours = f"{s}encoder.layers.{i}.", f"{t}decoder.layers.{i}."
        for hf_name, our_name in _LAYER_MAP.items():
            rules += [same(f"{ours}{our_name}.{param}", f"{layer}{hf_name}.{param}") for param in ("weight", "bias")]
        heads = vision.num_attention_heads
        rules += [
            fused_qkv(f"{ours}self_attention.linear_qkv.{param}",
                      *(f"{layer}self_attn.{p}_proj.{param}" for p in "qkv"),
                      heads, heads)
            for param in ("weight", "bias")
        ]
    return rules


def is_dropped(key: str, vision: VisionConfig) -> bool:
    """Whether an HF vision key (without prefix) is one the feature-layer encoder does not build:
    a later layer, the post-norm or SigLIP's pooling head."""
    match = _LAYER.match(key)
    return bool(match and int(match.group(1)) >= vision.layers_used) or key.startswith(("post_layernorm.", "head."))


def hf_vision_to_canonical(
    hf: Dict[str, torch.Tensor], vision: VisionConfig, target_prefix: str = "", source_prefix: Optional[str] = None
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Return (canonical state for ``VisionEncoder`` under ``target_prefix``, skipped HF keys)."""
    source_prefix = find_prefix(hf) if source_prefix is None else source_prefix
    rules = vision_rules(vision, source_prefix, target_prefix)
    out = {}
    for rule in rules:
        for key in rule.hf:
            if key not in hf:
                raise KeyError(f"HF vision weights lack {key}")
        out[rule.ours] = rule.to_ours([hf[key] for key in rule.hf])
    used = set(hf_names(rules))
    skipped = []
    for key in sorted(k for k in hf if k.startswith(source_prefix) and k not in used):
        if not is_dropped(key[len(source_prefix):], vision):
            raise KeyError(f"unexpected HF vision weight {key}")
        skipped.append(key)
    return out, skipped


def required_field(config: dict, key: str, where: str):
    """``config[key]``; a ConfigError naming ``where`` and the key when it is missing."""
    if key not in config:
        raise ConfigError(f"{where}: no {key!r}")
    return config[key]


def check_field(config: dict, key: str, allowed, default, where: str) -> None:
    """A ConfigError naming ``where`` unless ``config.get(key, default)`` is one of ``allowed``."""
    value = config.get(key, default)
    if value not in allowed:
        raise ConfigError(f"{where}: {key}={value!r} is not supported (supported: {list(allowed)})")


def vision_from_hf(vision: dict, feature_layer: int, where: str, base: Optional[VisionConfig] = None) -> VisionConfig:
    """VisionConfig of an HF SiglipVisionConfig / CLIPVisionConfig dict (or a SigLIP / CLIP
    config that nests one as ``vision_config``)."""
    model_type = vision.get("model_type")
    if model_type in ("siglip", "clip") and "vision_config" in vision:
        vision = {"model_type": f"{model_type}_vision_model", **vision["vision_config"]}
        where = f"{where}.vision_config"
        model_type = vision["model_type"]
    if model_type not in VISION_TYPES:
        raise ConfigError(f"{where}: model_type={model_type!r} is not a SigLIP or CLIP vision config")
    family = VISION_TYPES[model_type]
    check_field(vision, "hidden_act", (VISION_ACT[family],), VISION_ACT[family], where)
    return dataclasses.replace(
        base or VisionConfig(),
        family=family,
        num_layers=required_field(vision, "num_hidden_layers", where),
        hidden_size=required_field(vision, "hidden_size", where),
        num_attention_heads=required_field(vision, "num_attention_heads", where),
        ffn_hidden_size=required_field(vision, "intermediate_size", where),
        patch_size=required_field(vision, "patch_size", where),
        image_size=required_field(vision, "image_size", where),
        activation=OUR_VISION_ACT[family],
        norm_eps=vision.get("layer_norm_eps", 1e-6 if family == "siglip" else 1e-5),
        feature_layer=feature_layer,
    )


def vision_to_hf(vision: VisionConfig, num_layers: int, dtype: str) -> Dict[str, Any]:
    """An HF vision config with ``num_layers`` encoder layers (SigLIP without its pooling head)."""
    config = {
        "model_type": f"{vision.family}_vision_model",
        "hidden_size": vision.hidden_size,
        "intermediate_size": vision.ffn_hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": vision.num_attention_heads,
        "num_channels": 3,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "hidden_act": VISION_ACT[vision.family],
        "layer_norm_eps": vision.norm_eps,
        "attention_dropout": 0.0,
        "torch_dtype": dtype,
    }
    if vision.family == "siglip":
        config["vision_use_head"] = False
    return config
