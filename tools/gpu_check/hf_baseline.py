"""Step (d-hf): the fair race with transformers: the same model as the released ASVR code runs it, against
ours, on the same layers, batch, synthetic data, SDPA backends and loss rows, timed the same way.

transformers' LlavaForConditionalGeneration (a Llama text model and a SigLIP tower with the widths and
layer counts of step (d): 6 LLM layers) plus plain_head.PlainVisualHead over the image positions' final
hidden states; stage 2 trains the projector, the LLM and the head. The text CE runs over every position
and keeps the supervised rows, as ours does (model/loss.py). Two optimizer stacks, on both sides:

    pair A (the release's: DeepSpeed bf16): bf16 weights, fp32 master weights and gradients, clip 1.0,
           fused AdamW on the masters, the masters copied back -- ours: the recipe as it is (fast paths on)
    pair B (pure bf16): bf16 weights and gradients, clip 1.0, fused AdamW on the bf16 weights -- ours:
           train.master_weights=false

each for the LLaVA step (no visual head) and the ASVR step (--cpu: pair A's LLaVA and pair B's ASVR step).
A step is every micro-batch's forward + backward, then the optimizer step, between device events after a
synchronize; the median over the timed steps; the peak memory of each run. Our pair A rows are step (d)'s
fast runs when it ran (same process layout and config), else run here; pair B is run here.
"""

import gc
import json
import statistics
from contextlib import nullcontext
from typing import List

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from megatron_asvr.benchmark.synthetic import synthetic_micro_batches
from megatron_asvr.benchmark.timing import DeviceClock
from megatron_asvr.config import ModelConfig
from megatron_asvr.runtime.device import dtype_of
from megatron_asvr.runtime.fast_paths import FastPaths
from tools.gpu_check.plain_head import PlainVisualHead
from tools.gpu_check.report import ours_vs_transformers
from tools.gpu_check.shapes import llm_layers, throughput_config, throughput_overrides
from tools.gpu_check.step_io import OK, device, main
from tools.gpu_check.throughput import run_benchmark, run_rows

RUNS = [(pair, kind) for pair in ("A", "B") for kind in ("llava", "asvr")]
RUNS_CPU = [("A", "llava"), ("B", "asvr")]  # --cpu: both optimizer stacks and both steps, in half the runs
VOCAB_MULTIPLE = 64  # llava-hf pads 32000 text ids + the image token to 32064


def image_token_id(model: ModelConfig) -> int:
    return model.llm.vocab_size  # just above the text ids, as llava-hf's 32000


def llava_config(model: ModelConfig, seq_length: int):
    """A LlavaConfig with ``model``'s widths and layer counts (SigLIP cut after its feature layer, no pooling head)."""
    from transformers import LlamaConfig, LlavaConfig, SiglipVisionConfig

    llm, vision = model.llm, model.vision
    vocab = -(-(llm.vocab_size + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text = LlamaConfig(vocab_size=vocab, hidden_size=llm.hidden_size, intermediate_size=llm.ffn_hidden_size,
                       num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_attention_heads,
                       num_key_value_heads=llm.kv_heads, max_position_embeddings=max(seq_length,
                                                                                     llm.max_sequence_length),
                       rms_norm_eps=llm.norm_eps, tie_word_embeddings=False, use_cache=False)  # as LLaVA trains
    tower = SiglipVisionConfig(hidden_size=vision.hidden_size, intermediate_size=vision.ffn_hidden_size,
                               num_hidden_layers=vision.layers_used, num_attention_heads=vision.num_attention_heads,
                               image_size=vision.image_size, patch_size=vision.patch_size,
                               hidden_act="gelu_pytorch_tanh", layer_norm_eps=vision.norm_eps)
    tower.vision_use_head = False  # LLaVA drops SigLIP's pooling head
    return LlavaConfig(vision_config=tower, text_config=text, image_token_index=image_token_id(model),
                       image_seq_length=vision.num_patches, projector_hidden_act="gelu",
                       vision_feature_select_strategy="full", vision_feature_layer=-1,
                       multimodal_projector_bias=True, tie_word_embeddings=False)


def build(model: ModelConfig, seq_length: int, dev: torch.device, dtype: torch.dtype, seed: int):
    """(llava, head) on ``dev`` in ``dtype``, random weights; the vision tower frozen."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    spec = model.asvr.semantic
    with torch.device(dev):
        llava = LlavaForConditionalGeneration._from_config(llava_config(model, seq_length), dtype=dtype,
                                                            attn_implementation="sdpa")
        codebooks = [torch.randn(v, spec.dim, dtype=dtype) for v in spec.sizes[:-1]]
        head = PlainVisualHead(model.llm.hidden_size, model.asvr.head, spec, codebooks).to(dtype)
    llava.model.vision_tower.requires_grad_(False)
    return llava.train(), head.train()


class PlainOptimizer:
    """AdamW over ``params`` as transformers trainers run it: ``master`` (pair A) keeps fp32 copies that the
    fused AdamW steps, then copies back; else (pair B) fused AdamW on the parameters in their dtype. Both clip
    the global gradient norm to ``clip`` (foreach; the norm stays on the device)."""

    def __init__(self, params, lr: float, clip: float, master: bool):
        self.params, self.clip = list(params), clip
        fused = self.params[0].is_cuda
        self.masters = [p.detach().float() for p in self.params] if master else None
        self.adam = torch.optim.AdamW(self.masters or self.params, lr=lr, weight_decay=0.0, fused=fused)

    @torch.no_grad()
    def step(self) -> None:
        if self.masters is not None:
            for master, param in zip(self.masters, self.params):
                master.grad = param.grad.float()
        stepped = self.masters or self.params
        torch.nn.utils.clip_grad_norm_(stepped, self.clip, foreach=True)
        self.adam.step()
        if self.masters is not None:
            torch._foreach_copy_(self.params, self.masters)
            for master in self.masters:
                master.grad = None
        for param in self.params:
            param.grad = None


def train_step(llava, head, micro_batches, optimizer, model: ModelConfig) -> float:
    """Forward + backward of every micro-batch (text CE over every position, summed over the supervised ones;
    the visual CE), then the optimizer; the last micro-batch's loss."""
    for batch in micro_batches:
        b, s = batch.tokens.shape
        image_mask = torch.zeros(b * s, dtype=torch.bool, device=batch.tokens.device)
        image_mask = image_mask.index_fill_(0, batch.image_index, True).view(b, s)  # [b, s]
        ids = batch.tokens.masked_fill(image_mask, image_token_id(model))
        pixels = batch.images.to(llava.dtype)
        hidden = llava.model(input_ids=ids, pixel_values=pixels).last_hidden_state  # [b, s, H]
        logits = llava.lm_head(hidden)  # [b, s, V]
        per_token = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), reduction="none")
        mask = batch.loss_mask.flatten()
        loss = (per_token * mask).sum() / mask.sum()
        if head is not None:
            codes = batch.visual_targets["semantic"]  # [b * P, D]
            loss = loss + model.asvr.loss_weight * head(hidden[image_mask], codes).sum() / codes.shape[0]
        loss.backward()
    optimizer.step()
    return loss.item()


def time_transformers(config, dev, pair: str, kind: str) -> dict:
    """One transformers run: ``pair`` A or B, ``kind`` llava or asvr."""
    model, train, bench, positions = config.model, config.train, config.bench, config.data.seq_length
    llava, head = build(model, positions, dev, dtype_of(train.precision), train.seed)
    head = head if kind == "asvr" else None
    params = [p for m in (llava, head) if m is not None for p in m.parameters() if p.requires_grad]
    optimizer = PlainOptimizer(params, train.lr, train.clip_grad, master=pair == "A")
    micro = [m.to(dev) for m in synthetic_micro_batches(
        model, train.micro_batch, train.global_batch // train.micro_batch, positions, seed=train.seed)]
    backends = FastPaths.resolve(config.train.fast_paths, dev.type == "cuda").sdpa_backends()
    clock = DeviceClock()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(bench.warmup + bench.steps):
        clock.synchronize()
        start = clock.mark()
        with sdpa_kernel(backends, set_priority=True) if backends else nullcontext():
            losses.append(train_step(llava, head, micro, optimizer, model))
        end = clock.mark()
        clock.synchronize()
        if step >= bench.warmup:
            times.append(clock.seconds(start, end))
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    del llava, head, optimizer, micro
    gc.collect()
    return {"pair": pair, "kind": kind, "step_time_s": step_s, "min_step_time_s": min(times),
            "tokens_per_s": train.global_batch * positions / step_s, "peak_memory_gib": peak,
            "trained_params": sum(p.numel() for p in params), "losses": losses}


def ours(args, layers: int, planned: float) -> List[dict]:
    """Our rows, named <kind>-<pair>: pair A from step (d)'s fast runs if it ran, else run here; pair B here."""
    rows = []
    done = args.work.parent / "d.json"
    d = json.loads(done.read_text()) if done.is_file() else {}
    if d.get("status") == OK and d.get("llm_layers") == layers:
        rows += [dict(r, name={"baseline": "llava-A", "asvr": "asvr-A"}[r["name"]], profile=None) for r in d["runs"]
                 if r["name"] in ("baseline", "asvr")]
    else:
        data = run_benchmark(args.cpu, throughput_overrides(args.cpu, layers) + ["bench.mode=compare-asvr",
                                                                                 "bench.profile=false"], args.work)
        rows += [dict(r, name={"baseline": "llava-A", "asvr": "asvr-A"}[r["name"]]) for r in run_rows(data, planned)]
    data = run_benchmark(args.cpu, throughput_overrides(args.cpu, layers) + [
        f"bench.mode={'single' if args.cpu else 'compare-asvr'}", "bench.profile=false", "train.master_weights=false",
        "train.fast_paths.foreach_clip=true"], args.work / "B")  # pure bf16 clips with the foreach clip
    rows += [dict(r, name={"baseline": "llava-B", "asvr": "asvr-B"}[r["name"]]) for r in run_rows(data, planned)]
    return rows


def run(args) -> dict:
    dev = device(args.cpu)
    layers, planned = llm_layers(args.cpu, "6")
    config = throughput_config(args.cpu, layers)
    mine = ours(args, layers, planned)
    runs = [time_transformers(config, dev, pair, kind) for pair, kind in (RUNS_CPU if args.cpu else RUNS)]
    versus = ours_vs_transformers({"d-hf": {"runs": runs, "ours": mine}})
    summary = f"{layers} LLM layers, ours / transformers step time: " + ", ".join(
        f"{key} {v['ours_over_transformers_step_time']:.3f}" for key, v in versus.items())
    return {"status": OK, "summary": summary, "llm_layers": layers, "runs": runs, "ours": mine, "versus": versus}


if __name__ == "__main__":
    main(run, __doc__)
