"""The attention-map tool's work: one image and question -> the last token's attention over the
image, drawn over it as a PNG (matplotlib) with the question and the model's answer."""

from pathlib import Path

from megatron_asvr.config.tools import AttentionConfig
from megatron_asvr.evaluation.attention_map import AttentionMap, attention_map
from megatron_asvr.evaluation.heatmap import render
from megatron_asvr.evaluation.items import EvalItem, load_item_image
from megatron_asvr.evaluation.loading import open_model
from megatron_asvr.evaluation.plot import save_figure


def write_attention_png(request: AttentionConfig) -> AttentionMap:
    """Compute the map (collective), and on rank 0 write the PNG; returns the map on every rank."""
    request.validate()
    item = EvalItem("attention", request.question, Path(request.image), None, "short")
    image = load_item_image(item)
    with open_model(request.model) as loaded:
        result = attention_map(loaded.answerer, item, request.layers, request.heads)
        if loaded.writer:
            save_figure(render(image, result, loaded.answerer.encoder.image_mode, loaded.patch_size), request.out)
            print(f"answer: {result.answer!r}; {result.image_share:.1%} of the last token's attention on the image; "
                  f"wrote {request.out}", flush=True)
    return result
