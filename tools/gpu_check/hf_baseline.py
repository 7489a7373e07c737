"""Step (d), the baseline: the same model as the released ASVR code runs it, timed as tools/benchmark.py times ours.

transformers' LlavaForConditionalGeneration (a Llama text model and a SigLIP tower with the widths and
layer counts of step (d), the mlp2x_gelu projector, SDPA attention) plus plain_head.PlainVisualHead
over the image positions' final hidden states; stage 2 trains the projector, the LLM and the head
(AdamW); the same synthetic micro-batches. A step is every micro-batch's forward + backward, then
the optimizer step, between device events after a synchronize; the median over the timed steps.
"""

import statistics

import torch
import torch.nn.functional as F

from megatron_asvr.benchmark.synthetic import synthetic_micro_batches
from megatron_asvr.benchmark.timing import DeviceClock
from megatron_asvr.config import ModelConfig
from megatron_asvr.runtime.device import dtype_of
from tools.gpu_check.plain_head import PlainVisualHead
from tools.gpu_check.shapes import largest_llm_layers, throughput_config
from tools.gpu_check.step_io import OK, device, main

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


def train_step(llava, head, micro_batches, optimizer, model: ModelConfig) -> float:
    """Forward + backward of every micro-batch (text CE + visual CE, each a mean), then AdamW; the last loss."""
    for batch in micro_batches:
        b, s = batch.tokens.shape
        image_mask = torch.zeros(b * s, dtype=torch.bool, device=batch.tokens.device)
        image_mask = image_mask.index_fill_(0, batch.image_index, True).view(b, s)  # [b, s]
        ids = batch.tokens.masked_fill(image_mask, image_token_id(model))
        pixels = batch.images.to(llava.dtype)
        hidden = llava.model(input_ids=ids, pixel_values=pixels).last_hidden_state  # [b, s, H]
        logits = llava.lm_head(hidden)  # [b, s, V]
        mask = batch.loss_mask.bool()
        text = F.cross_entropy(logits[mask].float(), batch.labels[mask])
        codes = batch.visual_targets["semantic"]  # [b * P, D]
        visual = head(hidden[image_mask], codes).sum() / codes.shape[0]
        loss = text + model.asvr.loss_weight * visual
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run(args) -> dict:
    dev = device(args.cpu)
    layers, _ = largest_llm_layers(args.cpu)
    config = throughput_config(args.cpu, layers)
    model, train, bench, positions = config.model, config.train, config.bench, config.data.seq_length
    dtype = dtype_of(train.precision)
    llava, head = build(model, positions, dev, dtype, train.seed)
    params = [p for m in (llava, head) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=0.0, fused=dev.type == "cuda")
    micro = [m.to(dev) for m in synthetic_micro_batches(
        model, train.micro_batch, train.global_batch // train.micro_batch, positions, seed=train.seed)]
    clock = DeviceClock()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(bench.warmup + bench.steps):
        clock.synchronize()
        start = clock.mark()
        losses.append(train_step(llava, head, micro, optimizer, model))
        end = clock.mark()
        clock.synchronize()
        if step >= bench.warmup:
            times.append(clock.seconds(start, end))
    step_s = statistics.median(times)
    tokens = train.global_batch * positions
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    trained = sum(p.numel() for p in params)
    summary = (f"{layers} LLM layers: step {step_s:.3f} s, {tokens / step_s:,.0f} tokens/s"
               + (f", peak {peak:.1f} GiB" if peak is not None else "") + f"; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return {"status": OK, "summary": summary, "llm_layers": layers, "step_time_s": step_s,
            "min_step_time_s": min(times), "tokens_per_s": tokens / step_s, "peak_memory_gib": peak,
            "trained_params": trained, "losses": losses}


if __name__ == "__main__":
    main(run, __doc__)
