"""A tiny ASVR VLM on fixed synthetic samples: the model issue's equivalence case.

Four samples: one image at the start, text only, two images, one image in the
middle of the prompt. Images are random pixels, their codes random per branch.
"""

import dataclasses
import zlib
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from tests.support.harness import Case, merged_reports
from megatron_asvr.config import ASVRConfig, CodebookSpec, HeadConfig, LLMConfig, ModelConfig, VisionConfig
from megatron_asvr.data.batch import build_micro_batch
from megatron_asvr.data.packing import length_multiple_for, plan_step
from megatron_asvr.data.sequence import build_sequence
from megatron_asvr.data.targets import ZERO_IMAGE
from megatron_asvr.model.loss import LossReport
from megatron_asvr.model.specs import resolve_backend
from megatron_asvr.model.vlm import stage_builder
from megatron_asvr.tokenizers.templates import IMAGE_PLACEHOLDER
from megatron_asvr.training.task import ASVRTask

TINY_MODEL = ModelConfig(
    vision=VisionConfig(num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, image_size=28),
    llm=LLMConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                  vocab_size=256, max_sequence_length=64),
    asvr=ASVRConfig(
        head=HeadConfig(hidden_size=32, num_layers=2, num_attention_heads=4),
        semantic=CodebookSpec(sizes=[20, 24, 17], dim=12),
        appearance=CodebookSpec(sizes=[16, 16], dim=8),
    ),
    transformer_impl="local",
)
BOS, PATCHES = 1, 4  # 28-pixel images, 14-pixel patches
BRANCHES = ("semantic", "appearance")


def codebooks(model: ModelConfig) -> Dict[str, List[torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return {
        branch: [torch.randn(v, spec.dim, generator=g) for v in spec.sizes]
        for branch, spec in (("semantic", model.asvr.semantic), ("appearance", model.asvr.appearance))
    }


def _sample_layouts() -> List[List[str]]:
    """Token kinds per sample: B(os), I(mage), P(rompt), A(nswer)."""
    return [
        ["B", "I", "P", "P", "A", "A", "A"],
        ["B", "P", "P", "P", "A", "A"],
        ["B", "I", "I", "P", "A", "A", "A", "A"],
        ["B", "P", "I", "P", "P", "A", "A"],
    ]


@dataclass
class VLMCase(Case):
    model: ModelConfig = field(default_factory=lambda: TINY_MODEL)
    global_batch: int = 4
    micro_batch: int = 1
    seq_length: int = 24
    # Adam's first step moves every weight by ~lr * sign(grad); with eps 1e-8, weights whose
    # gradient is rounding noise (~1e-10, e.g. dead projector inputs) would move by a
    # layout-dependent +-lr. eps 1e-6 keeps such updates ~0 so params compare at 1e-5.
    adam_eps: float = 1e-6
    config_changes: dict = field(default_factory=dict)  # applied to every TransformerConfig
    batching: str = "pad_full"  # data.batching: micro_batch counts rows when packed

    def chunk_builder(self):
        model = dataclasses.replace(self.model, trainable=list(self.model.trainable))
        every_part, llm_part = self.transformer_changes()
        return stage_builder(model, self.parallel, resolve_backend(model.transformer_impl), codebooks(model),
                             self.params_dtype, llm_part, **every_part, **self.config_changes)

    def _samples(self, step: int):
        g = torch.Generator().manual_seed(2000 + step)
        asvr = self.model.asvr
        samples = []
        for layout in _sample_layouts():
            kinds = list(layout)
            images = [f"img{step}_{len(samples)}_{i}" for i in range(kinds.count("I"))]
            if not images and asvr.supervise_text_only:
                kinds.insert(1, "I")
                images = [ZERO_IMAGE]
            ids = [BOS if k == "B" else IMAGE_PLACEHOLDER if k == "I" else int(torch.randint(3, 250, (1,), generator=g))
                   for k in kinds]
            supervised = [k == "A" for k in kinds]
            samples.append((build_sequence(ids, supervised, [PATCHES] * len(images), self.seq_length), images))
        return samples

    def _image(self, name: str):
        """Pixels and per-branch codes of an image (the zero image: zero pixels, fixed codes)."""
        # crc32, not hash(): str hashes are salted per interpreter, and every run must see the same data
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) if name != ZERO_IMAGE else 0)
        pixels = torch.zeros(3, 28, 28) if name == ZERO_IMAGE else torch.randn(3, 28, 28, generator=g)
        codes = {
            branch: torch.stack([torch.randint(0, v, (PATCHES,), generator=g) for v in spec.sizes], dim=1)
            for branch, spec in ((b, getattr(self.model.asvr, b)) for b in BRANCHES)
        }
        return pixels, codes

    def global_batch_data(self, step):
        samples = self._samples(step)
        asvr = self.model.asvr
        p = self.parallel
        plans = plan_step([s.length for s, _ in samples], self.batching, self.micro_batch, self.seq_length,
                          length_multiple_for(p.tensor_parallel, p.sequence_parallel),
                          p.pipeline_parallel if p.virtual_pipeline else 1)
        micro = []
        for plan in plans:
            group = [samples[i] for i in plan.samples]
            images = [self._image(name) for _, names in group for name in names]
            micro.append(build_micro_batch(
                [s for s, _ in group], plan,
                images=torch.stack([p for p, _ in images]) if images else None,
                input_codes=torch.stack([c["semantic"] for _, c in images]) if images else None,
                codes={branch: [c[branch] for _, c in images] for branch in BRANCHES},
                depths={branch: getattr(asvr, branch).depth for branch in BRANCHES},
                target_shift=asvr.target_shift,
            ))
        return micro

    def task(self):
        return ASVRTask(self.model.asvr)


def losses(results, model: ModelConfig, key: str = "reports") -> Dict[str, float]:
    """Global text and visual losses per step from the reports (summed over micro-batches)."""
    per_step: Dict[int, List[LossReport]] = {}
    for (step, _), report in merged_reports(results, key).items():
        per_step.setdefault(step, []).append(report)
    out = {}
    for step, reports in per_step.items():
        summed = LossReport.reduce(reports)
        out[f"{step}/text"] = (summed.text[0] / summed.text[1]).item()
        for branch in model.asvr.branches:
            report = summed.branches[branch]
            rows = report.rows[0]
            out[f"{step}/{branch}"] = (report.ce.mean() / rows).item() if rows > 0 else 0.0
            for d, value in enumerate((report.ce / rows.clamp(min=1)).tolist()):
                out[f"{step}/{branch}/ce{d}"] = value
    return out
