"""A random SigLIP vision model in HF format (config.json + model.safetensors) for the demo.

The demo's visual tokenizer is fitted on this encoder's features
(tools/fit_visual_tokenizer.py --encoder), as a real run fits on (or uses
DualToken's) fine-tuned SigLIP. Written with plain safetensors: HF
``SiglipVisionModel`` key names and config fields, no transformers needed.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_asvr.config import VisionConfig


def random_siglip_weights(vision: VisionConfig, seed: int = 0) -> dict:
    """HF ``SiglipVisionModel`` weights (without prefix) with the usual initialisation scales."""
    g = torch.Generator().manual_seed(seed)
    w, f, p = vision.hidden_size, vision.ffn_hidden_size, vision.patch_size

    def normal(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    state = {
        "embeddings.patch_embedding.weight": normal(w, 3, p, p, std=(3 * p * p) ** -0.5),
        "embeddings.patch_embedding.bias": torch.zeros(w),
        "embeddings.position_embedding.weight": normal(vision.num_patches, w),
        "post_layernorm.weight": torch.ones(w),
        "post_layernorm.bias": torch.zeros(w),
    }
    for i in range(vision.num_layers):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{layer}self_attn.{proj}.weight"] = normal(w, w, std=w**-0.5)
            state[f"{layer}self_attn.{proj}.bias"] = torch.zeros(w)
        for norm in ("layer_norm1", "layer_norm2"):
            state[f"{layer}{norm}.weight"] = torch.ones(w)
            state[f"{layer}{norm}.bias"] = torch.zeros(w)
        state[f"{layer}mlp.fc1.weight"] = normal(f, w, std=w**-0.5)
        state[f"{layer}mlp.fc1.bias"] = torch.zeros(f)
        state[f"{layer}mlp.fc2.weight"] = normal(w, f, std=f**-0.5)
        state[f"{layer}mlp.fc2.bias"] = torch.zeros(w)
    return state


def write_random_siglip(directory: Path, vision: VisionConfig, seed: int = 0) -> Path:
    """Write ``config.json`` (a SiglipVisionConfig) and ``model.safetensors`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "siglip_vision_model",
        "architectures": ["SiglipVisionModel"],
        "hidden_size": vision.hidden_size,
        "intermediate_size": vision.ffn_hidden_size,
        "num_hidden_layers": vision.num_layers,
        "num_attention_heads": vision.num_attention_heads,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": vision.norm_eps,
        "num_channels": 3,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = {f"vision_model.{k}": v.contiguous() for k, v in random_siglip_weights(vision, seed).items()}
    save_file(weights, str(directory / "model.safetensors"))
    return directory
