"""From a templated sample (one placeholder per image) to fixed-length model inputs.

Each image placeholder expands to that image's visual positions; labels are
the next token, never an image position; text may be truncated at the end,
but a sequence that would cut or lose an image raises ``SequenceTooLong``
(the loader counts it as a drop, or fails, per its configuration).
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from megatron_asvr.tokenizers.templates import IMAGE_PLACEHOLDER


class SequenceTooLong(ValueError):
    """Expanding the images does not fit the sequence length without cutting an image."""


@dataclass
class SequenceSample:
    tokens: torch.Tensor  # [S] int64; image positions hold the pad id
    labels: torch.Tensor  # [S] int64; the next token
    loss_mask: torch.Tensor  # [S] float; 1 where labels[i] is a supervised text token
    image_mask: torch.Tensor  # [S] bool; positions that take image features
    image_tokens: List[int]  # visual positions of each image, in order
    length: int  # real positions (the rest is padding): what packing and padding-to-longest keep


def build_sequence(
    input_ids: Sequence[int],
    supervised: Sequence[bool],
    image_token_counts: Sequence[int],
    seq_length: int,
    pad_id: int = 0,
) -> SequenceSample:
    """Expand placeholders, shift labels, truncate text, pad to ``seq_length``."""
    input_ids = np.asarray(input_ids, dtype=np.int64)  # [n]
    placeholder = input_ids == IMAGE_PLACEHOLDER  # [n]
    if int(placeholder.sum()) != len(image_token_counts):
        raise ValueError(f"{int(placeholder.sum())} image placeholders but {len(image_token_counts)} images")
    widths = np.ones(len(input_ids), dtype=np.int64)  # [n] positions each id becomes
    widths[placeholder] = image_token_counts
    ids = np.repeat(np.where(placeholder, pad_id, input_ids), widths)  # [positions]
    sup = np.repeat(np.asarray(supervised, dtype=bool) & ~placeholder, widths)  # [positions]
    is_image = np.repeat(placeholder, widths)  # [positions]
    # Inputs are positions 0..S-1, labels 1..S: every image position must be an input.
    image_at = np.flatnonzero(is_image)
    last_image = int(image_at[-1]) if len(image_at) else -1
    if last_image >= seq_length:
        raise SequenceTooLong(
            f"{len(ids)} positions after expanding {len(image_token_counts)} image(s) "
            f"({sum(image_token_counts)} visual positions) do not fit seq_length={seq_length}"
        )
    n = min(len(ids) - 1, seq_length)
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(seq_length)
    image_mask = torch.zeros(seq_length, dtype=torch.bool)
    tokens[:n] = torch.from_numpy(ids[:n])
    labels[:n] = torch.from_numpy(ids[1:n + 1])
    loss_mask[:n] = torch.from_numpy(sup[1:n + 1])
    image_mask[: len(is_image)] = torch.from_numpy(is_image[:seq_length])
    return SequenceSample(tokens, labels, loss_mask, image_mask, list(image_token_counts), max(n, last_image + 1))


def align_visual_targets(
    codes: Sequence[torch.Tensor], supervised: Sequence[bool], depth: int, shift: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-image codes [P_i, D] -> targets for each visual position [sum P, D] and a row mask.

    ``shift`` 0: position j predicts patch j (the released code). 1: patch j + 1
    of the same image; each image's last position has no target and is masked.
    Unsupervised images (``supervised[i]`` False) are masked entirely.
    """
    targets = [torch.zeros(0, depth, dtype=torch.long)]
    masks = [torch.zeros(0, dtype=torch.bool)]
    for image_codes, flag in zip(codes, supervised):
        p = image_codes.shape[0]
        if shift:
            image_codes = torch.cat([image_codes[shift:], image_codes.new_zeros(shift, image_codes.shape[1])])
        mask = torch.arange(p) < p - shift
        targets.append(image_codes.long())
        masks.append(mask & bool(flag))
    return torch.cat(targets), torch.cat(masks)
