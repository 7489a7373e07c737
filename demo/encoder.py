"""The demo's vision encoder: a SigLIP vision model in HF format (config.json + model.safetensors).

Real runs start from a pretrained SigLIP; the demo cannot download one, so this
module builds an encoder whose features are informative by construction: the
patch embedding takes the mean brightness and colour (two opponent-colour
channels) of each of the patch's ``blocks x blocks`` sub-blocks and of the whole
patch, and the position embedding adds sinusoids of the patch's row and column.
The demo's recipes use 128-pixel patches: one per cell of the scenes' 3 x 3 grid,
whose shapes never leave their cell, so each visual token holds one object, as a
pretrained encoder's do. Its transformer layers are random with their residual branches
scaled by ``BRANCH_SCALE``, so the features stay close to that layout, as a
trained encoder's early layers stay close to their input. Both the demo's model
(imported with tools/convert.py) and its visual tokenizer
(tools/fit_visual_tokenizer.py --encoder) use it. Written with plain safetensors:
HF ``SiglipVisionModel`` key names and config fields, no transformers needed.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_asvr.config import VisionConfig

BLOCKS = 8  # sub-blocks per patch side whose mean colours are features (default)
FREQUENCIES = 4  # sinusoids per axis (sin and cos each) in the position embedding
CHROMA_GAIN = 4.0  # opponent-colour features over brightness
PATCH_GAIN = 8.0  # whole-patch means over the sub-block ones: a shape covers a fraction of its patch
BRANCH_SCALE = 0.05  # residual-branch output weights, relative to the usual initialisation


def _block_colours(width: int, patch: int, blocks: int, whole: int) -> torch.Tensor:
    """Patch-embedding weights whose first 3 * blocks**2 outputs are, per sub-block, the mean
    brightness and two opponent-colour (chroma) means scaled by CHROMA_GAIN: grey, white and
    black backgrounds have no chroma, the shapes' saturated colours a large one. Outputs
    ``whole`` .. ``whole + 2`` are the same three means over the whole patch, scaled by PATCH_GAIN:
    a shape's colour wherever it sits in its patch, as a pretrained encoder's features are."""
    mixes = torch.tensor([[1 / 3, 1 / 3, 1 / 3],  # brightness
                          [2 ** -0.5, -(2 ** -0.5), 0.0],  # red - green
                          [6 ** -0.5, 6 ** -0.5, -2 * 6 ** -0.5]])  # yellow - blue
    mixes[1:] *= CHROMA_GAIN
    weight = torch.zeros(width, 3, patch, patch)  # [w, c, p, p]
    weight[whole:whole + 3] = PATCH_GAIN * mixes.view(3, 3, 1, 1) / patch**2
    side = patch // blocks
    for feature in range(3):
        for row in range(blocks):
            for column in range(blocks):
                out = (feature * blocks + row) * blocks + column
                block = weight[out, :, row * side:(row + 1) * side, column * side:(column + 1) * side]
                block += mixes[feature].view(3, 1, 1) / side**2
    return weight


def _grid_sinusoids(width: int, grid: int, first: int) -> torch.Tensor:
    """Position embedding: sin / cos of k * pi * (row + 0.5) / grid and of the column, k = 1..FREQUENCIES."""
    table = torch.zeros(grid * grid, width)  # [num_patches, w]
    coords = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    rows, columns = coords.repeat_interleave(grid), coords.repeat(grid)  # patches in row-major order
    out = first
    for axis in (rows, columns):
        for k in range(1, FREQUENCIES + 1):
            table[:, out], table[:, out + 1] = torch.sin(k * math.pi * axis), torch.cos(k * math.pi * axis)
            out += 2
    return table


def demo_siglip_weights(vision: VisionConfig, seed: int = 0, blocks: int = BLOCKS) -> dict:
    """HF ``SiglipVisionModel`` weights (without prefix), built as the module docstring says."""
    w, f, p = vision.hidden_size, vision.ffn_hidden_size, vision.patch_size
    colour_dims, position_dims = 3 * blocks**2, 4 * FREQUENCIES
    needed = colour_dims + position_dims + 3  # + the whole-patch means
    if p % blocks or w < needed:
        raise ValueError(f"the demo encoder with {blocks} x {blocks} blocks needs patch_size divisible by {blocks} "
                         f"and hidden_size >= {needed}; got {p} and {w}")
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std):
        return torch.randn(*shape, generator=g) * std

    grid = vision.image_size // p
    state = {
        "embeddings.patch_embedding.weight": _block_colours(w, p, blocks, colour_dims + position_dims),
        "embeddings.patch_embedding.bias": torch.zeros(w),
        "embeddings.position_embedding.weight": _grid_sinusoids(w, grid, colour_dims),
        "post_layernorm.weight": torch.ones(w),
        "post_layernorm.bias": torch.zeros(w),
    }
    for i in range(vision.num_layers):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            scale = BRANCH_SCALE if proj == "out_proj" else 1.0
            state[f"{layer}self_attn.{proj}.weight"] = normal(w, w, std=scale * w**-0.5)
            state[f"{layer}self_attn.{proj}.bias"] = torch.zeros(w)
        for norm in ("layer_norm1", "layer_norm2"):
            state[f"{layer}{norm}.weight"] = torch.ones(w)
            state[f"{layer}{norm}.bias"] = torch.zeros(w)
        state[f"{layer}mlp.fc1.weight"] = normal(f, w, std=w**-0.5)
        state[f"{layer}mlp.fc1.bias"] = torch.zeros(f)
        state[f"{layer}mlp.fc2.weight"] = normal(w, f, std=BRANCH_SCALE * f**-0.5)
        state[f"{layer}mlp.fc2.bias"] = torch.zeros(w)
    return state


def write_demo_siglip(directory: Path, vision: VisionConfig, seed: int = 0, blocks: int = BLOCKS) -> Path:
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
    weights = {f"vision_model.{k}": v.contiguous() for k, v in demo_siglip_weights(vision, seed, blocks).items()}
    save_file(weights, str(directory / "model.safetensors"))
    return directory
