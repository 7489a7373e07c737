"""Training data: LLaVA records (llava), validation (validate), shards (shards), the pass (preprocess).

Import the submodules directly; ``shards`` and ``preprocess`` pull in megatron-core.
"""
