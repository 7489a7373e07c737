"""Sample lengths like LLaVA-1.5's training data, for throughput benchmarks (packed or padded).

Where the numbers come from:

- Stage 1, LLaVA-558K (LAION/CC/SBU images with BLIP captions): every sample is one image and
  one short exchange, a brief-description instruction and its caption. The composition is
  the LLaVA-1.5 paper's (Liu et al., "Improved Baselines with Visual Instruction Tuning",
  arXiv 2310.03744, section 4 and Table 7); the text lengths are our estimate from the format
  (a ~10-token instruction from LLaVA's fixed list plus a BLIP caption of 10-20 words), not a
  measurement of the released JSON.
- Stage 2, the 665K mixture of LLaVA-1.5 (Table 7 of the same paper): LLaVA-Instruct 158K,
  ShareGPT 40K (text only: 6% of the mixture), VQAv2 83K, GQA 72K, OKVQA 9K, OCR-VQA 80K,
  A-OKVQA 66K, TextCaps 22K, RefCOCO 48K, Visual Genome 86K. The counts are the paper's; each
  component's text length (a log-normal median and spread, in Llama tokens) is our estimate
  from its format: multi-turn conversations and detailed descriptions for LLaVA-Instruct,
  long chats for ShareGPT, several short questions of one image merged into one conversation
  for the VQA sets, region descriptions for RefCOCO / VG.
"""

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

STAGE1: Dict[str, Tuple[int, float, float, bool]] = {
    # component: (samples, median text tokens, log-normal sigma, has an image)
    "llava_558k_blip_captions": (558_128, 30, 0.3, True),
}
STAGE2: Dict[str, Tuple[int, float, float, bool]] = {
    "llava_instruct_158k": (157_712, 280, 0.5, True),
    "sharegpt_40k": (40_688, 800, 0.8, False),
    "vqav2_83k": (82_783, 150, 0.5, True),
    "gqa_72k": (72_140, 150, 0.5, True),
    "okvqa_9k": (8_998, 80, 0.4, True),
    "ocrvqa_80k": (80_000, 120, 0.4, True),
    "a_okvqa_66k": (66_160, 80, 0.4, True),
    "textcaps_22k": (21_953, 40, 0.3, True),
    "refcoco_48k": (48_447, 200, 0.5, True),
    "vg_86k": (86_417, 200, 0.5, True),
}
DISTRIBUTIONS = {"stage1": STAGE1, "stage2": STAGE2, "both": {**STAGE1, **STAGE2}}


@dataclass(frozen=True)
class DrawnSample:
    text_tokens: int
    has_image: bool


def draw_lengths(distribution: str, count: int, seq_length: int, image_positions: int,
                 seed=0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` draws of ``distribution`` (a key of DISTRIBUTIONS) as arrays: component (index into
    the mixture's names) [count], text tokens [count] and has an image [count] bool. Components come
    in their share of the mixture, text lengths log-normal, cut so that a sample fits ``seq_length``
    with its image."""
    mix = DISTRIBUTIONS[distribution]
    samples, medians, sigmas, images = (np.array(column) for column in zip(*mix.values()))
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(mix), size=count, p=samples / samples.sum())
    has_image = images[picks].astype(bool)
    room = seq_length - np.where(has_image, image_positions, 0) - 4  # BOS, the prompt's start, one label
    drawn = rng.lognormal(np.log(medians[picks].astype(np.float64)), sigmas[picks])
    return picks, np.minimum(np.maximum(drawn, 4), room).astype(np.int64), has_image


def draw_samples(distribution: str, count: int, seq_length: int, image_positions: int,
                 seed: int = 0) -> List[DrawnSample]:
    """``count`` samples of ``distribution`` ("stage1" | "stage2"), as :func:`draw_lengths` draws them."""
    _, tokens, has_image = draw_lengths(distribution, count, seq_length, image_positions, [seed, count])
    return [DrawnSample(int(t), bool(i)) for t, i in zip(tokens, has_image)]
