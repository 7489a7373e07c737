"""The vocabulary mapping between our language model and llava-hf.

Ours: the embedding and the output layer have ``llm.vocab_size`` token rows,
then zero rows up to ``padded_vocab_size`` for tensor parallelism. Padding rows
are not tokens: they are never exported and never predicted. Image positions
hold token 0 and are marked by ``image_mask``.

llava-hf: the tokenizer gains ``<image>`` (``image_token_index``) and ``<pad>``,
and the embedding is padded (llava-1.5-hf: 32000 tokens, ``<image>`` = 32000,
``<pad>`` = 32001, 32064 rows); image positions hold ``image_token_index``.

- Import of a LlavaForConditionalGeneration: every HF row is one of our tokens
  (``llm.vocab_size`` = ``text_config.vocab_size``, 32064 for llava-1.5), the
  ``<image>`` and ``<pad>`` rows included (they are never targets). The
  checkpoint's ``hf_vocab.json`` keeps ``image_token_index``, ``pad_token_id``
  and the row count; export writes the same rows back, so HF -> ours -> HF is
  bit-identical.
- Import of a bare LLaMA / Mistral: ``llm.vocab_size`` = its ``vocab_size``
  (32000) and there is no ``hf_vocab.json``. Export then appends llava-hf's
  tokens after the last one: ``<image>`` = ``vocab_size``, ``<pad>`` =
  ``vocab_size + 1``, rows rounded up to a multiple of 64 (32064, as
  llava-1.5-hf). Every appended row of the embedding and the LM head is the
  mean of the existing rows (HF's resize initialisation without its noise): an
  appended token's logit is the mean of the real logits, never their strict
  maximum, so greedy decoding never picks one.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_asvr.checkpoint.directory import HF_VOCAB
from megatron_asvr.config import ConfigError

ROW_MULTIPLE = 64  # llava-hf pads its embedding to a multiple of 64 rows
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


@dataclass(frozen=True)
class HFVocab:
    """The HF side of the mapping: its special token ids and its number of embedding rows."""

    image_token_index: Optional[int]  # None: a bare LM's own rows (an LLM-only export)
    pad_token_id: Optional[int]
    rows: int

    def validate(self, llm_vocab: int, where: str) -> None:
        if self.rows < llm_vocab:
            raise ConfigError(f"{where}: {self.rows} HF rows cannot hold the LM's {llm_vocab} tokens")
        for name in ("image_token_index", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.rows:
                raise ConfigError(f"{where}: {name}={value} is outside the {self.rows} embedding rows")

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> "HFVocab":
        try:
            return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"{path}: not an HF vocabulary record: {err}") from err


def checkpoint_vocab(directory) -> Optional[HFVocab]:
    """The llava-hf vocabulary record of a checkpoint imported from llava-hf, else None."""
    path = Path(directory) / HF_VOCAB
    return HFVocab.read(path) if path.is_file() else None


def appended_vocab(llm_vocab: int) -> HFVocab:
    """llava-hf's tokens after an LM's ``llm_vocab`` tokens: <image>, <pad>, rows to a multiple of 64."""
    rows = -(-(llm_vocab + 2) // ROW_MULTIPLE) * ROW_MULTIPLE
    return HFVocab(image_token_index=llm_vocab, pad_token_id=llm_vocab + 1, rows=rows)


def bare_vocab(llm_vocab: int) -> HFVocab:
    """A bare LLaMA's vocabulary: its ``llm_vocab`` rows, no ``<image>``, no ``<pad>``."""
    return HFVocab(image_token_index=None, pad_token_id=None, rows=llm_vocab)


def rows_to_hf(weight: torch.Tensor, llm_vocab: int, vocab: HFVocab) -> torch.Tensor:
    """Our [padded, h] embedding / output weight -> the HF [vocab.rows, h] one."""
    tokens = weight[:llm_vocab]
    extra = vocab.rows - llm_vocab
    if not extra:
        return tokens
    mean = tokens.float().mean(dim=0, keepdim=True).to(weight.dtype)  # [1, h]
    return torch.cat([tokens, mean.expand(extra, -1)])


def rows_to_ours(weight: torch.Tensor, llm_vocab: int, padded: int, name: str) -> torch.Tensor:
    """The HF [llm_vocab, h] weight ``name`` -> ours, zero rows appended up to ``padded``."""
    if weight.shape[0] != llm_vocab:
        raise ValueError(f"{name} has {weight.shape[0]} rows, the config says vocab_size={llm_vocab}")
    if padded == llm_vocab:
        return weight
    return torch.cat([weight, weight.new_zeros(padded - llm_vocab, *weight.shape[1:])])
