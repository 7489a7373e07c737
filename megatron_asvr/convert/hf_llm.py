"""HF LLaMA / Vicuna / Mistral (GQA) / Qwen2 / Qwen2.5 / Qwen3 decoder weights <-> our language model's
canonical names.

Per layer: q / k / v fuse into megatron's per-group QKV rows (GQA-aware,
``model.qkv``), Qwen2's q / k / v biases likewise; gate / up stack into the
gated MLP's [gate; up] FC1; the norms (Qwen3's per-head ``q_norm`` / ``k_norm``
included) and projections keep their values. No q / k permutation: HF LLaMA and
megatron both apply RoPE with ``rotate_half`` over the two halves of each head
(HF's own conversion from Meta's interleaved layout already permuted q / k
once); the logit tests against transformers prove it. The embedding and the LM
head go through the vocabulary mapping of ``convert.hf_vocab``. A tied LM head
(``tie_word_embeddings``) is not in the HF file: our last pipeline stage's copy
of it is made from the embedding on import and not written on export.
"""

from typing import List

from megatron_asvr.config import LLMConfig
from megatron_asvr.convert.hf_vocab import HFVocab, rows_to_hf, rows_to_ours
from megatron_asvr.model.hf_rules import TensorRule, fused_qkv, same, stacked_rows
from megatron_asvr.model.llm import padded_vocab_size

# our layer-local name -> HF layer-local name
_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def vocab_rows(ours: str, hf: str, llm: LLMConfig, vocab: HFVocab, tensor_parallel: int,
               import_only: bool = False) -> TensorRule:
    """An embedding / LM-head weight through the vocabulary mapping."""
    padded = padded_vocab_size(llm.vocab_size, tensor_parallel)
    return TensorRule(
        ours, (hf,),
        lambda t: rows_to_ours(t[0], llm.vocab_size, padded, hf),
        lambda t: [rows_to_hf(t, llm.vocab_size, vocab)],
        import_only,
    )


def attention_rules(llm: LLMConfig, ours: str, hf: str) -> List[TensorRule]:
    """One layer's fused QKV weight, and its bias (Qwen2) or its q / k norms (Qwen3)."""
    def qkv(param: str) -> TensorRule:
        return fused_qkv(ours + f"self_attention.linear_qkv.{param}",
                         *(f"{hf}self_attn.{p}_proj.{param}" for p in "qkv"), llm.num_attention_heads, llm.kv_heads)

    rules = [qkv("weight")] + ([qkv("bias")] if llm.qkv_bias else [])
    if llm.qk_norm:
        rules += [same(ours + f"self_attention.{p}_layernorm.weight", hf + f"self_attn.{p}_norm.weight") for p in "qk"]
    return rules


def llm_rules(
    llm: LLMConfig, vocab: HFVocab, tensor_parallel: int, hf_prefix: str = "model.",
    lm_head: str = "lm_head.weight", target_prefix: str = "language_model.",
) -> List[TensorRule]:
    """Rules for the whole decoder: HF names under ``hf_prefix`` (``model.`` in a LlamaForCausalLM,
    ``language_model.model.`` in llava-hf) and the LM head ``lm_head`` (unless tied to the embedding)."""
    t = target_prefix
    rules = [vocab_rows(t + "embedding.word_embeddings.weight", hf_prefix + "embed_tokens.weight", llm, vocab,
                        tensor_parallel)]
    for i in range(llm.num_layers):
        hf, ours = f"{hf_prefix}layers.{i}.", f"{t}decoder.layers.{i}."
        rules += [same(ours + our_name, hf + hf_name) for our_name, hf_name in _LAYER_MAP.items()]
        rules += attention_rules(llm, ours, hf)
        gate_up = (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight")
        rules.append(stacked_rows(ours + "mlp.linear_fc1.weight", gate_up))
    rules.append(same(t + "decoder.final_layernorm.weight", hf_prefix + "norm.weight"))
    if llm.untie_embeddings:
        rules.append(vocab_rows(t + "output_layer.weight", lm_head, llm, vocab, tensor_parallel))
    else:
        rules.append(vocab_rows(t + "output_layer.weight", hf_prefix + "embed_tokens.weight", llm, vocab,
                                tensor_parallel, import_only=True))
    return rules
