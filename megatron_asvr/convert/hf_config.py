"""HF config.json files (LLaMA / Mistral / Qwen2 / Qwen2.5 / Qwen3, LLaVA) <-> our ModelConfig; the vision
part is ``model.hf_vision`` (SigLIP / CLIP).

Reading accepts what transformers 4.x and 5.x write (``rope_theta`` or
``rope_parameters``); anything our model cannot compute exactly (an output-projection
or MLP bias, other activations, RoPE scaling, sliding-window layers in a Qwen model)
is a ``ConfigError`` naming the file and the key. Qwen2's q/k/v biases, Qwen3's q/k
norms, an explicit ``head_dim`` and tied embeddings are read. Writing produces the
classic llava-hf fields, which both transformers generations read.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from megatron_asvr.config import ConfigError, LLMConfig, ModelConfig, VisionConfig
from megatron_asvr.convert.hf_vocab import HFVocab
from megatron_asvr.model.hf_vision import check_field, required_field, vision_from_hf, vision_to_hf

TEXT_TYPES = ("llama", "mistral", "qwen2", "qwen3")
QWEN_TYPES = ("qwen2", "qwen3")
# Qwen's tokenizers (Qwen2 to Qwen3 alike): <|endoftext|> (pretraining's end of document, no BOS is
# prepended) and <|im_end|> (ChatML's end of turn, where generation stops).
QWEN_ENDOFTEXT, QWEN_IM_END = 151643, 151645
# LLaVA's feature selection per encoder: SigLIP has no class token, CLIP's is dropped.
SELECT_STRATEGY = {"siglip": "full", "clip": "default"}


# an HF image processor's "resample" (PIL's filter numbers) <-> vision.resample
RESAMPLE_CODES = {"bilinear": 2, "bicubic": 3}
PROCESSOR_CONFIG = "preprocessor_config.json"


def read_resample(directory, base: VisionConfig) -> VisionConfig:
    """``base`` with the resize filter of the image processor saved beside an HF vision model (SigLIP2's
    is bilinear); ``base`` unchanged when the directory has no processor config."""
    path = Path(directory) / PROCESSOR_CONFIG
    if not path.is_file():
        return base
    code = read_config_file(path).get("resample", RESAMPLE_CODES["bicubic"])
    names = {number: name for name, number in RESAMPLE_CODES.items()}
    if code not in names:
        raise ConfigError(f"{path}: resample={code!r} is not supported (supported: {names})")
    return dataclasses.replace(base, resample=names[code])


def read_config_file(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the HF config: {err}") from err


def read_config(directory) -> Dict[str, Any]:
    return read_config_file(Path(directory) / "config.json")


def _rope_theta(text: dict, where: str) -> float:
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ConfigError(f"{where}: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def _sliding_window(text: dict, where: str) -> Optional[int]:
    """Mistral's window; a Qwen config has one only with ``use_sliding_window: true`` (then only on some
    layers, which we cannot build), whatever its ``sliding_window`` field says."""
    if text["model_type"] == "mistral":
        return text.get("sliding_window")
    layer_types = text.get("layer_types") or []
    if text.get("use_sliding_window") or "sliding_attention" in layer_types:
        raise ConfigError(f"{where}: use_sliding_window=true (sliding-window attention on some layers) is not "
                          f"supported for {text['model_type']}: only full attention on every layer")
    return None


def llm_from_hf(text: dict, where: str, base: Optional[LLMConfig] = None) -> LLMConfig:
    """LLMConfig of an HF Llama / Mistral / Qwen2 / Qwen3 config dict; other fields from ``base`` (or the
    defaults)."""
    check_field(text, "model_type", TEXT_TYPES, None, where)
    check_field(text, "hidden_act", ("silu",), "silu", where)
    model_type = text["model_type"]
    # Qwen2's q/k/v always carry biases (and o_proj none); elsewhere attention_bias would bias o_proj too.
    if model_type != "qwen2":
        check_field(text, "attention_bias", (False,), False, where)
    check_field(text, "mlp_bias", (False,), False, where)
    hidden, heads = required_field(text, "hidden_size", where), required_field(text, "num_attention_heads", where)
    head_dim = text.get("head_dim")
    kv_heads = text.get("num_key_value_heads") or heads
    return dataclasses.replace(
        base or LLMConfig(),
        num_layers=required_field(text, "num_hidden_layers", where),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=None if kv_heads == heads else kv_heads,
        head_dim=None if head_dim in (None, hidden // heads) else head_dim,
        ffn_hidden_size=required_field(text, "intermediate_size", where),
        vocab_size=required_field(text, "vocab_size", where),
        max_sequence_length=required_field(text, "max_position_embeddings", where),
        rotary_base=_rope_theta(text, where),
        norm_eps=text.get("rms_norm_eps", 1e-6),
        sliding_window=_sliding_window(text, where),
        untie_embeddings=not text.get("tie_word_embeddings", False),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
    )


def hf_text_type(llm: LLMConfig) -> str:
    """The HF model type that computes ``llm``: qwen3 (q/k norm), qwen2 (q/k/v biases), mistral
    (a sliding window) or llama."""
    if llm.qk_norm and llm.qkv_bias:
        raise ConfigError("llm.qk_norm with llm.qkv_bias has no HF model type (Qwen3 has no biases)")
    if (llm.qk_norm or llm.qkv_bias) and llm.sliding_window is not None:
        raise ConfigError("llm.sliding_window with a Qwen model (qk_norm or qkv_bias) has no HF export: Qwen "
                          "configs slide the window on some layers only")
    if llm.qk_norm:
        return "qwen3"
    if llm.qkv_bias:
        return "qwen2"
    return "mistral" if llm.sliding_window is not None else "llama"


def bos_eos(llm: LLMConfig) -> Tuple[int, int]:
    """The BOS and EOS ids an export writes: LLaMA's <s> / </s>; Qwen's <|endoftext|> / <|im_end|>."""
    return (QWEN_ENDOFTEXT, QWEN_IM_END) if hf_text_type(llm) in QWEN_TYPES else (1, 2)


def llm_to_hf(llm: LLMConfig, vocab: HFVocab, dtype: str) -> Dict[str, Any]:
    """An HF text config: Qwen3Config, Qwen2Config, MistralConfig or LlamaConfig (``hf_text_type``)."""
    model_type = hf_text_type(llm)
    architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM"}[model_type]
    bos, eos = bos_eos(llm)
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.ffn_hidden_size,
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.kv_heads,
        "head_dim": llm.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": llm.max_sequence_length,
        "rms_norm_eps": llm.norm_eps,
        "rope_theta": llm.rotary_base,
        "vocab_size": vocab.rows,
        "tie_word_embeddings": not llm.untie_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": vocab.pad_token_id,
        "torch_dtype": dtype,
    }
    if model_type == "mistral":
        config["sliding_window"] = llm.sliding_window
    elif model_type in QWEN_TYPES:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=llm.num_layers,
                      rope_scaling=None)
        if model_type == "qwen3":
            config["attention_bias"] = False
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
        "tie_word_embeddings": not model.llm.untie_embeddings,
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

