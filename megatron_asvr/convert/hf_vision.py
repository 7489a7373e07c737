"""HF SiglipVisionModel / CLIPVisionModel weights -> our VisionEncoder's canonical names.

Used by the LLaVA encoder and by the visual tokenizer's encoder. Strict: a
missing weight is an error naming it; keys that are not part of the model are
an error too, except the ones a feature-layer encoder deliberately drops
(later layers, the post-norm, SigLIP's pooling head), which are returned as
``skipped``.
"""

import re
from typing import Dict, List, Tuple

import torch

from megatron_asvr.config import VisionConfig
from megatron_asvr.convert.qkv import fuse_qkv

_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_LAYER_MAP = {
    "layer_norm1": "input_layernorm",
    "self_attn.out_proj": "self_attention.linear_proj",
    "layer_norm2": "pre_mlp_layernorm",
    "mlp.fc1": "mlp.linear_fc1",
    "mlp.fc2": "mlp.linear_fc2",
}


_ANCHOR = "embeddings.patch_embedding.weight"


def find_prefix(keys) -> str:
    """What precedes the vision model's own key names: ``""`` (an in-memory transformers 5
    model), ``vision_model.`` (hub files), ``siglip_model.vision_model.`` (DualToken), ..."""
    prefixes = [key[: -len(_ANCHOR)] for key in keys if key.endswith(_ANCHOR)]
    if len(prefixes) != 1:
        raise KeyError(f"expected one '*{_ANCHOR}' key in the HF vision weights, found {len(prefixes)}")
    return prefixes[0]


def hf_vision_to_canonical(
    hf: Dict[str, torch.Tensor], vision: VisionConfig, target_prefix: str = "", source_prefix: str = None
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Return (canonical state for ``VisionEncoder`` under ``target_prefix``, skipped HF keys)."""
    source_prefix = find_prefix(hf) if source_prefix is None else source_prefix
    src = {k[len(source_prefix):]: v for k, v in hf.items() if k.startswith(source_prefix)}
    out, used, skipped = {}, set(), []

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise KeyError(f"HF vision weights lack {source_prefix}{key}")
        used.add(key)
        return src[key]

    t = target_prefix + "vit."
    out[t + "conv1.weight"] = take("embeddings.patch_embedding.weight")
    if vision.kind == "siglip":
        out[t + "conv1.bias"] = take("embeddings.patch_embedding.bias")
    else:
        out[t + "class_token"] = take("embeddings.class_embedding").reshape(1, 1, -1)
        out[t + "ln_pre.weight"] = take("pre_layrnorm.weight")
        out[t + "ln_pre.bias"] = take("pre_layrnorm.bias")
    out[t + "position_embeddings.weight"] = take("embeddings.position_embedding.weight")

    heads = vision.num_attention_heads
    for i in range(vision.layers_used):
        layer, ours = f"encoder.layers.{i}.", f"{t}decoder.layers.{i}."
        for hf_name, our_name in _LAYER_MAP.items():
            for kind in ("weight", "bias"):
                out[f"{ours}{our_name}.{kind}"] = take(f"{layer}{hf_name}.{kind}")
        for kind in ("weight", "bias"):
            q, k, v = (take(f"{layer}self_attn.{p}_proj.{kind}") for p in "qkv")
            out[f"{ours}self_attention.linear_qkv.{kind}"] = fuse_qkv(q, k, v, heads, heads)

    for key in sorted(set(src) - used):
        match = _LAYER.match(key)
        dropped = (match and int(match.group(1)) >= vision.layers_used) or key.startswith(
            ("post_layernorm.", "head.")
        )
        if not dropped:
            raise KeyError(f"unexpected HF vision weight {source_prefix}{key}")
        skipped.append(source_prefix + key)
    return out, skipped
