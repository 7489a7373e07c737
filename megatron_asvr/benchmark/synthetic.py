"""Synthetic micro-batches at the model's real shapes.

Every sample fills the whole sequence: BOS, one image (all its patch positions),
a 16-token prompt, then supervised answer tokens up to the last position, with
random token ids, random pixels and random visual codes for every image
position. Built with the loader's own functions (``data.sequence``), so the
model sees exactly what training feeds it.
"""

from typing import List

import torch

from megatron_asvr.config import ModelConfig
from megatron_asvr.data.batch import MicroBatch, build_micro_batch
from megatron_asvr.data.sequence import IMAGE_PLACEHOLDER, build_sequence

BOS, PROMPT_TOKENS, FIRST_ID = 1, 16, 3  # ids below FIRST_ID are special


def synthetic_sample_ids(model: ModelConfig, seq_length: int, generator: torch.Generator):
    """(token ids with one image placeholder, supervised flags) for one full-length sample."""
    # BOS + image + prompt + answer = seq_length + 1 ids: the last one is only a label.
    answer = seq_length - model.vision.num_patches - PROMPT_TOKENS
    text = torch.randint(FIRST_ID, model.llm.vocab_size, (PROMPT_TOKENS + answer,), generator=generator).tolist()
    ids = [BOS, IMAGE_PLACEHOLDER] + text
    supervised = [False] * (2 + PROMPT_TOKENS) + [True] * answer
    return ids, supervised


def synthetic_micro_batches(model: ModelConfig, micro_batch: int, num_micro: int, seq_length: int,
                            seed: int = 0) -> List[MicroBatch]:
    """``num_micro`` host micro-batches of ``micro_batch`` full-length samples."""
    g = torch.Generator().manual_seed(seed)
    g_codes = torch.Generator().manual_seed(seed + 1)  # tokens and pixels do not depend on the heads
    patches, size = model.vision.num_patches, model.vision.image_size
    out = []
    for _ in range(num_micro):
        samples = [build_sequence(*synthetic_sample_ids(model, seq_length, g), [patches], seq_length)
                   for _ in range(micro_batch)]
        images = torch.randn(micro_batch, 3, size, size, generator=g)
        codes = {
            branch: [torch.stack([torch.randint(0, v, (patches,), generator=g_codes)
                                  for v in getattr(model.asvr, branch).sizes], dim=1)
                     for _ in range(micro_batch)]  # per image [P, D]
            for branch in model.asvr.branches
        }
        out.append(build_micro_batch(samples, images=images, codes=codes,
                                     depths={b: getattr(model.asvr, b).depth for b in model.asvr.branches},
                                     target_shift=model.asvr.target_shift))
    return out
