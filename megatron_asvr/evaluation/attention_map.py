"""Where the last prompt token looks: its softmax attention over the image's visual positions,
per decoder layer and head (the paper's Figure 3), from our model at any TP / PP.

Forward pre-hooks on each layer's core attention see the rotated query and key
[s, b, heads, d]; the last position's attention is recomputed from them
(scale, grouped keys, sliding window as the core attention applies them) for
that one row, gathered over the TP ranks' heads and over the pipeline's layers.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.utils import get_attr_wrapped_model

from megatron_asvr.evaluation.answerer import Answerer
from megatron_asvr.evaluation.items import EvalItem
from megatron_asvr.evaluation.queries import to_sample


class AttentionMapError(ValueError):
    """A map that cannot be drawn: no image, or layers / heads the model does not have."""


def last_row_attention(query: torch.Tensor, key: torch.Tensor, scale: float,
                       window_left: Optional[int], row: Optional[int] = None) -> torch.Tensor:
    """Softmax attention of query position ``row`` (default the last) over the keys up to it.

    query [sq, b, np, d], key [sk, b, ng, d] (np a multiple of ng) -> [b, np, row + 1] fp32.
    ``window_left``: keys more than this many positions back are masked (sliding window).
    """
    row = query.shape[0] - 1 if row is None else row
    q = query[row].float()  # [b, np, d]
    k = key[:row + 1].float().repeat_interleave(query.shape[2] // key.shape[2], dim=2)  # [row + 1, b, np, d]
    scores = torch.einsum("bnd,sbnd->bns", q, k) * scale  # [b, np, row + 1]
    if window_left is not None and window_left >= 0:
        distance = row - torch.arange(row + 1, device=key.device)  # [row + 1]
        scores = scores.masked_fill(distance > window_left, float("-inf"))
    return torch.softmax(scores, dim=-1)


class LastTokenAttention:
    """Records position ``row``'s attention (default the last position's) of every decoder layer
    on this rank while enabled. Give the prompt's last position where the forward pads the
    sequence (sequence parallelism rounds it up to a multiple of the TP size)."""

    def __init__(self, chunks: List[torch.nn.Module], row: Optional[int] = None):
        self.row = row
        self.maps: Dict[int, torch.Tensor] = {}  # global layer number -> [b, np_local, row + 1]
        self._handles = []
        for chunk in chunks:
            decoder = get_attr_wrapped_model(chunk, "language_model").decoder
            for layer in decoder.layers:
                attention = layer.self_attention
                self._handles.append(attention.core_attention.register_forward_pre_hook(
                    self._hook(layer.layer_number, attention.core_attention, attention.config)))

    def _hook(self, layer_number: int, core, config):
        scale = getattr(core, "softmax_scale", None) or 1.0 / math.sqrt(config.kv_channels)
        window = getattr(core, "window_size", None)

        def record(module, args):
            query, key = args[0], args[1]
            self.maps[layer_number] = last_row_attention(query, key, scale, window[0] if window else None, self.row)

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def gathered(self) -> Dict[int, torch.Tensor]:
        """Every layer's map with all heads, on every rank: layer number -> [b, np, s] (collective)."""
        local = {}
        for number, probs in self.maps.items():
            heads_last = probs.transpose(1, 2).contiguous()  # [b, s, np_local]
            local[number] = gather_from_tensor_model_parallel_region(heads_last).transpose(1, 2).cpu()  # [b, np, s]
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        return {n: p for part in parts for n, p in part.items()}


@dataclass
class AttentionMap:
    question: str
    answer: str
    grid: np.ndarray  # [g, g] mean attention of the last token on the image's (base-view) patches
    layers: List[int]  # 1-based decoder layers averaged
    heads: List[int]  # 0-based heads averaged
    image_share: float  # the selected maps' mean attention mass on the image's positions


def _select(values: Optional[Sequence[int]], available: Sequence[int], what: str) -> List[int]:
    if values is None:
        return list(available)
    unknown = sorted(set(values) - set(available))
    if unknown:
        raise AttentionMapError(f"{what} {unknown} do not exist "
                                f"(the model has {what} {min(available)}..{max(available)})")
    return list(values)


def attention_map(answerer: Answerer, item: EvalItem, layers: Optional[Sequence[int]] = None,
                  heads: Optional[Sequence[int]] = None) -> AttentionMap:
    """The last prompt token's attention over ``item``'s image, averaged over ``layers`` and
    ``heads`` (default all), and the model's greedy answer (collective over all ranks)."""
    if item.image is None:
        raise AttentionMapError(f"question {item.question_id} has no image to attend to")
    query = answerer.encoder.prompt(item)
    recorder = LastTokenAttention(answerer.runner.chunks, query.length - 1)
    try:
        answerer.runner.next_tokens([query])
    finally:
        recorder.remove()
    maps = recorder.gathered()  # layer -> [1, np, s]
    layers = _select(layers, sorted(maps), "layers")
    heads = _select(heads, range(next(iter(maps.values())).shape[1]), "heads")
    stacked = torch.stack([maps[n][0, heads] for n in layers])  # [layers, heads, s]
    image_positions = to_sample(query, query.length).image_mask.nonzero().squeeze(-1)  # [P_total]
    patches = answerer.encoder.patches_per_tile
    on_image = stacked[..., image_positions]  # [layers, heads, P_total]
    grid = on_image[..., :patches].mean(dim=(0, 1))  # base view (the whole image) [patches]
    side = math.isqrt(patches)
    return AttentionMap(
        question=item.prompt, answer=answerer.generate([item])[0],
        grid=grid.reshape(side, side).numpy(), layers=layers, heads=heads,
        image_share=on_image.sum(-1).mean().item(),
    )
