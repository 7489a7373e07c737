"""HF config.json files (LLaMA / Mistral, LLaVA) <-> our ModelConfig; the vision part is
``model.hf_vision`` (SigLIP / CLIP).

Reading accepts what transformers 4.x and 5.x write (``rope_theta`` or
``rope_parameters``); anything our model cannot compute exactly (biases, other
activations, RoPE scaling, tied embeddings, a head_dim other than
hidden / heads) is a ``ConfigError`` naming the file and the key. Writing
produces the classic llava-hf fields, which both transformers generations read.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from megatron_asvr.config import ConfigError, LLMConfig, ModelConfig, VisionConfig
from megatron_asvr.convert.hf_vocab import HFVocab
from megatron_asvr.model.hf_vision import check_field, required_field, vision_from_hf, vision_to_hf

TEXT_TYPES = ("llama", "mistral")
# LLaVA's feature selection per encoder: SigLIP has no class token, CLIP's is dropped.
SELECT_STRATEGY = {"siglip": "full", "clip": "default"}


def read_config(directory) -> Dict[str, Any]:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the HF config: {err}") from err


def _rope_theta(text: dict, where: str) -> float:
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ConfigError(f"{where}: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def llm_from_hf(text: dict, where: str, base: Optional[LLMConfig] = None) -> LLMConfig:
    """LLMConfig of an HF LlamaConfig / MistralConfig dict; other fields from ``base`` (or the defaults)."""
    check_field(text, "model_type", TEXT_TYPES, None, where)
    check_field(text, "hidden_act", ("silu",), "silu", where)
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        check_field(text, flag, (False,), False, where)
    hidden, heads = required_field(text, "hidden_size", where), required_field(text, "num_attention_heads", where)
    if text.get("head_dim") not in (None, hidden // heads):
        raise ConfigError(f"{where}: head_dim={text['head_dim']} is not hidden_size / num_attention_heads")
    kv_heads = text.get("num_key_value_heads") or heads
    window = text.get("sliding_window") if text["model_type"] == "mistral" else None
    return dataclasses.replace(
        base or LLMConfig(),
        num_layers=required_field(text, "num_hidden_layers", where),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=None if kv_heads == heads else kv_heads,
        ffn_hidden_size=required_field(text, "intermediate_size", where),
        vocab_size=required_field(text, "vocab_size", where),
        max_sequence_length=required_field(text, "max_position_embeddings", where),
        rotary_base=_rope_theta(text, where),
        norm_eps=text.get("rms_norm_eps", 1e-6),
        sliding_window=window,
        untie_embeddings=True,
    )


def llm_to_hf(llm: LLMConfig, vocab: HFVocab, dtype: str) -> Dict[str, Any]:
    """An HF text config: MistralConfig with a sliding window, LlamaConfig otherwise."""
    if not llm.untie_embeddings:
        raise ConfigError("llm.untie_embeddings=false: tied embeddings are not supported by the HF export")
    mistral = llm.sliding_window is not None
    config = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.ffn_hidden_size,
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.kv_heads,
        "head_dim": llm.hidden_size // llm.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": llm.max_sequence_length,
        "rms_norm_eps": llm.norm_eps,
        "rope_theta": llm.rotary_base,
        "vocab_size": vocab.rows,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": vocab.pad_token_id,
        "torch_dtype": dtype,
    }
    if mistral:
        config["sliding_window"] = llm.sliding_window
    else:
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1, rope_scaling=None)
    return config


def llava_from_hf(config: dict, where: str, base: Optional[ModelConfig] = None) -> Tuple[ModelConfig, HFVocab]:
    """(ModelConfig, vocabulary mapping) of an HF LlavaConfig dict; ASVR settings from ``base``."""
    base = base or ModelConfig()
    check_field(config, "model_type", ("llava",), None, where)
    check_field(config, "projector_hidden_act", ("gelu",), "gelu", where)
    check_field(config, "multimodal_projector_bias", (True,), True, where)
    feature_layer = config.get("vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise ConfigError(f"{where}: vision_feature_layer={feature_layer!r}: only one feature layer is supported")
    vision_config = required_field(config, "vision_config", where)
    vision = vision_from_hf(vision_config, feature_layer, f"{where}.vision_config", base.vision)
    check_field(config, "vision_feature_select_strategy", (SELECT_STRATEGY[vision.family],), "default", where)
    text = required_field(config, "text_config", where)
    llm = llm_from_hf(text, f"{where}.text_config", base.llm)
    image_token = config.get("image_token_index", config.get("image_token_id", 32000))
    pad = text.get("pad_token_id", config.get("pad_token_id"))
    vocab = HFVocab(image_token_index=image_token, pad_token_id=pad, rows=llm.vocab_size)
    vocab.validate(llm.vocab_size, where)
    return dataclasses.replace(base, vision=vision, llm=llm), vocab


def llava_to_hf(
    model: ModelConfig, vocab: HFVocab, vision_layers: int, feature_layer: int, dtype: str
) -> Dict[str, Any]:
    """An HF LlavaConfig dict for ``model`` with a ``vision_layers``-layer tower."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision_to_hf(model.vision, vision_layers, dtype),
        "text_config": llm_to_hf(model.llm, vocab, dtype),
        "image_token_index": vocab.image_token_index,
        "image_seq_length": model.vision.num_patches,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": feature_layer,
        "vision_feature_select_strategy": SELECT_STRATEGY[model.vision.family],
        "tie_word_embeddings": False,
        "pad_token_id": vocab.pad_token_id,
        "torch_dtype": dtype,
    }


def check_same_vision(ours: VisionConfig, theirs: VisionConfig, where: str) -> None:
    """The encoder fields that must agree between our tower and an HF one (not the feature layer)."""
    for field in ("family", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                  "patch_size", "image_size"):
        if getattr(ours, field) != getattr(theirs, field):
            raise ConfigError(
                f"{where}: vision {field}={getattr(theirs, field)!r} differs from the checkpoint's "
                f"{getattr(ours, field)!r}"
            )

