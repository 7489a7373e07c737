"""From a templated sample (one placeholder per image) to fixed-length model inputs.

Each image placeholder expands to that image's visual positions; labels are
the next token, never an image position; text may be truncated at the end,
but a sequence that would cut or lose an image raises ``SequenceTooLong``
(the loader counts it as a drop, or fails, per its configuration).
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

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
    placeholders = sum(1 for t in input_ids if t == IMAGE_PLACEHOLDER)
    if placeholders != len(image_token_counts):
        raise ValueError(f"{placeholders} image placeholders but {len(image_token_counts)} images")
    ids, sup, is_image = [], [], []
    counts = iter(image_token_counts)
    for token, flag in zip(input_ids, supervised):
        if token == IMAGE_PLACEHOLDER:
            n = next(counts)
            ids += [pad_id] * n
            sup += [False] * n
            is_image += [True] * n
        else:
            ids.append(token)
            sup.append(bool(flag))
            is_image.append(False)
    # Inputs are positions 0..S-1, labels 1..S: every image position must be an input.
    last_image = max((i for i, v in enumerate(is_image) if v), default=-1)
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
    tokens[:n] = torch.tensor(ids[:n])
    labels[:n] = torch.tensor(ids[1:n + 1])
    loss_mask[:n] = torch.tensor(sup[1:n + 1], dtype=torch.float)
    image_mask[: len(is_image)] = torch.tensor(is_image[:seq_length])
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
