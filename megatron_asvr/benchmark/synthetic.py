"""Synthetic micro-batches at the model's real shapes, laid out as training lays them out.

A sample is BOS, one image (all its patch positions) unless text-only, a 16-token prompt, then
supervised answer tokens: up to the last position (``lengths="full"``) or as long as a draw
from LLaVA-1.5's length mixtures says (``benchmark.lengths``). Random token ids, pixels and
visual codes. This rank's samples are planned into micro-batches by the same rule as the loader
(``data.packing.plan_step``: full padding, padding to the longest, or packing) and built by the
loader's function (``data.batch.build_micro_batch``), so the model sees what training feeds it.
"""

from typing import List, Tuple

import torch

from megatron_asvr.benchmark.lengths import draw_samples
from megatron_asvr.config import ModelConfig
from megatron_asvr.config.schema import PROMPT_TOKENS
from megatron_asvr.data.batch import MicroBatch, build_micro_batch
from megatron_asvr.data.packing import plan_step
from megatron_asvr.data.sequence import IMAGE_PLACEHOLDER, SequenceSample, build_sequence

BOS, FIRST_ID = 1, 3  # ids below FIRST_ID are special


def synthetic_sample_ids(model: ModelConfig, text_tokens: int, has_image: bool, generator: torch.Generator):
    """(token ids, supervised flags) for one sample: BOS, the image placeholder, ``text_tokens`` of
    prompt then answer, and one more id that is only a label."""
    prompt = min(PROMPT_TOKENS, text_tokens - 1)
    answer = text_tokens - prompt
    text = torch.randint(FIRST_ID, model.llm.vocab_size, (prompt + answer,), generator=generator).tolist()
    ids = [BOS] + ([IMAGE_PLACEHOLDER] if has_image else []) + text
    supervised = [False] * (len(ids) - answer) + [True] * answer
    return ids, supervised


def synthetic_samples(model: ModelConfig, count: int, seq_length: int, lengths: str,
                      generator: torch.Generator) -> List[Tuple[SequenceSample, bool]]:
    """(sequence, has an image) of ``count`` samples: full-length, or drawn from ``lengths``."""
    patches = model.vision.num_patches
    if lengths == "full":  # BOS + image + prompt + answer = seq_length + 1 ids
        draws = [(seq_length - patches, True)] * count
    else:
        draws = [(d.text_tokens, d.has_image) for d in
                 draw_samples(lengths, count, seq_length, patches,
                              int(torch.randint(2**31, (1,), generator=generator)))]
    return [(build_sequence(*synthetic_sample_ids(model, text, image, generator), [patches] if image else [],
                            seq_length), image) for text, image in draws]


def synthetic_micro_batches(model: ModelConfig, micro_batch: int, samples: int, seq_length: int, seed: int = 0,
                            batching: str = "pad_full", lengths: str = "full", length_multiple: int = 1,
                            micro_multiple: int = 1) -> List[MicroBatch]:
    """This rank's ``samples`` samples as host micro-batches (``micro_batch`` samples each, or rows
    when packed)."""
    g = torch.Generator().manual_seed(seed)
    g_codes = torch.Generator().manual_seed(seed + 1)  # tokens and pixels do not depend on the heads
    patches, size = model.vision.num_patches, model.vision.image_size
    drawn = synthetic_samples(model, samples, seq_length, lengths, g)
    out = []
    for plan in plan_step([s.length for s, _ in drawn], batching, micro_batch, seq_length, length_multiple,
                          micro_multiple):
        group = [drawn[i] for i in plan.samples]
        images = sum(image for _, image in group)
        codes = {
            branch: [torch.stack([torch.randint(0, v, (patches,), generator=g_codes)
                                  for v in getattr(model.asvr, branch).sizes], dim=1)
                     for _ in range(images)]  # per image [P, D]
            for branch in model.asvr.branches
        }
        out.append(build_micro_batch(
            [s for s, _ in group], plan, images=torch.randn(images, 3, size, size, generator=g) if images else None,
            codes=codes, depths={b: getattr(model.asvr, b).depth for b in model.asvr.branches},
            target_shift=model.asvr.target_shift,
        ))
    return out
