"""Benchmark evaluation: local benchmark files, the paper's prompts, scorers, greedy decoding and
answer-likelihood scoring at any TP / PP (or on an HF export), the in-training held-out score, and
last-token attention maps.

    benchmark file -> EvalItems -> Answerer (prompt template, tokenizer, images)
                   -> runner (our checkpoint through megatron's schedule, or transformers)
                   -> predictions -> scorer -> table + JSON
"""
