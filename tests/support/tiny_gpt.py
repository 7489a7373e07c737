"""A tiny LLaMA-shaped GPT on fixed random batches: the foundation's equivalence case."""

from dataclasses import dataclass, field
from functools import partial

import torch

from tests.support.harness import Case
from megatron_asvr.config import LLMConfig
from megatron_asvr.data.batch import MicroBatch
from megatron_asvr.model.llm import build_llm, llm_transformer_config
from megatron_asvr.model.loss import LossReport
from megatron_asvr.model.specs import resolve_backend

TINY_LLAMA = LLMConfig(
    num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
    ffn_hidden_size=96, vocab_size=256, max_sequence_length=32,
)


def _loss_func(loss_mask, per_token):
    loss_sum = (per_token.float() * loss_mask).sum()
    count = loss_mask.sum().to(torch.int)
    return loss_sum, count, LossReport(torch.stack([loss_sum.detach(), loss_mask.sum()]))


@dataclass
class GPTCase(Case):
    llm: LLMConfig = field(default_factory=lambda: TINY_LLAMA)

    def chunk_builder(self):
        self.llm.validate(self.parallel)
        backend = resolve_backend("local")
        every_part, llm_part = self.transformer_changes()
        config = llm_transformer_config(self.llm, self.parallel, backend, params_dtype=self.params_dtype,
                                        **every_part, **llm_part)
        return lambda pre, post, vp: build_llm(self.llm, config, backend, pre, post, vp)

    def global_batch_data(self, step):
        g = torch.Generator().manual_seed(1000 + step)
        n, s = self.global_batch, self.seq_length
        tokens = torch.randint(0, self.llm.vocab_size, (n, s + 1), generator=g)
        loss_mask = (torch.rand(n, s, generator=g) > 0.2).float()
        return [
            MicroBatch(
                tokens=tokens[i:i + self.micro_batch, :-1],
                labels=tokens[i:i + self.micro_batch, 1:],
                loss_mask=loss_mask[i:i + self.micro_batch],
                position_ids=torch.arange(s).expand(self.micro_batch, s),
            )
            for i in range(0, n, self.micro_batch)
        ]

    def task(self):
        return GPTTask()


class GPTTask:
    """Per-token LM loss; megatron normalises by the summed loss-mask count."""

    def prepare(self, micro, last_stage):
        pass

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        per_token = model(batch.tokens, batch.position_ids, None, labels=batch.labels)  # [b, s]
        return per_token, partial(_loss_func, batch.loss_mask)


def mean_losses(results, key="reports"):
    """{(step, micro-batch): mean LM loss} from the last-stage ranks."""
    from tests.support.harness import merged_reports

    return {k: (r.text[0] / r.text[1]).item() for k, r in merged_reports(results, key).items()}
