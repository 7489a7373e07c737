"""Benchmark evaluation: local benchmark files, the paper's prompts, scorers, greedy decoding and
answer-likelihood scoring at any TP / PP (or on an HF export), the in-training held-out score, and
last-token attention maps.

    benchmark file -> EvalItems (suites/) -> Answerer (answerer.py: queries.py, prompts.py)
                   -> runner (runners.py: our checkpoint through megatron's schedule; hf_runner.py)
                   -> predictions -> scorer (suites/) -> table + JSON (report.py)
                   -> the paper's 14-benchmark table and average (paper_table.py, --suite paper14)

Entry points: ``run.run_evaluation`` (tools/evaluate.py), ``attention_tool.write_attention_png``
(tools/attention_map.py), ``in_training.HeldOutScore`` (training loop, ``train.eval_interval``),
``experiment.run_experiment`` (tools/experiment_asvr_vs_llava.py).
"""
