"""The attention-map tool's work: one image and question -> the last token's attention over the
image, drawn over it as a PNG (matplotlib) with the question and the model's answer."""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from megatron_asvr.config import ConfigError
from megatron_asvr.evaluation.attention_map import AttentionMap, attention_map
from megatron_asvr.evaluation.heatmap import render
from megatron_asvr.evaluation.items import EvalItem, load_item_image
from megatron_asvr.evaluation.loading import ModelSpec, open_model
from megatron_asvr.evaluation.plot import save_figure


@dataclass
class AttentionRequest:
    model: ModelSpec  # a checkpoint of ours (attention is read from our layers)
    image: Path
    question: str  # the whole user turn, answer prompt included if wanted
    out: Path  # the PNG
    layers: Optional[List[int]] = None  # 1-based decoder layers; None = all
    heads: Optional[List[int]] = None  # 0-based heads; None = all


def write_attention_png(request: AttentionRequest) -> AttentionMap:
    """Compute the map (collective), and on rank 0 write the PNG; returns the map on every rank."""
    if request.model.checkpoint is None:
        raise ConfigError("the attention map reads our model's layers: give a checkpoint, not an HF export")
    item = EvalItem("attention", request.question, Path(request.image), None, "short")
    image = load_item_image(item)
    with open_model(request.model) as loaded:
        result = attention_map(loaded.answerer, item, request.layers, request.heads)
        if loaded.writer:
            save_figure(render(image, result, loaded.answerer.encoder.image_mode, loaded.patch_size), request.out)
            print(f"answer: {result.answer!r}; {result.image_share:.1%} of the last token's attention on the image; "
                  f"wrote {request.out}", flush=True)
    return result
