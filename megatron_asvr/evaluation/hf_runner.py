"""The HF-export path: an exported LlavaForConditionalGeneration directory run by transformers,
with the same queries, padding and reductions as ``runners.MegatronRunner`` (one process)."""

from pathlib import Path
from typing import List

import torch

from megatron_asvr.evaluation.queries import Query
from megatron_asvr.evaluation.runners import Runner, last_positions, micro_batches


class HFRunner(Runner):
    def __init__(self, directory: Path, vocab_limit: int, micro_batch: int = 4, dtype: torch.dtype = torch.float32):
        import transformers

        self.model = transformers.LlavaForConditionalGeneration.from_pretrained(str(directory), dtype=dtype).eval()
        self.image_token = self.model.config.image_token_id
        self.vocab_limit, self.micro_batch, self.dtype = vocab_limit, micro_batch, dtype
        vision = self.model.config.vision_config
        self.patch_size = vision.patch_size
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.patches_per_tile = (vision.image_size // vision.patch_size) ** 2

    @torch.no_grad()
    def _logits(self, queries: List[Query]):
        """(batch, logits [b, s, vocab_limit] fp32) per micro-batch."""
        for batch in micro_batches(queries, self.micro_batch):
            b, s = batch.tokens.shape
            input_ids = batch.tokens.flatten().index_fill(0, batch.image_index, self.image_token).view(b, s)
            pixels = batch.images.to(self.dtype) if batch.images is not None else None
            logits = self.model(input_ids=input_ids, pixel_values=pixels).logits  # [b, s, V_hf]
            yield batch, logits[..., : self.vocab_limit].float()

    def next_tokens(self, queries: List[Query]) -> List[int]:
        ids = []
        for batch, logits in self._logits(queries):
            ids += logits[torch.arange(logits.shape[0]), last_positions(batch, logits.device)].argmax(-1).tolist()
        return ids[: len(queries)]

    def answer_logprobs(self, queries: List[Query]) -> List[float]:
        scores = []
        for batch, logits in self._logits(queries):
            logprobs = torch.log_softmax(logits, -1).gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)  # [b, s]
            scores += (logprobs * batch.loss_mask).sum(-1).tolist()
        return scores[: len(queries)]
