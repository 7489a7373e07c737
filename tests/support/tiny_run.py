"""A complete tiny training set-up on disk: the demo pipeline at test size.

``make_tiny_run(root)`` writes (in one process, via the library APIs the tools
wrap): the tiny synthetic corpus, the demo's SigLIP, a fitted visual tokenizer,
stage-1 shards and targets. ``tiny_run_config(root, ...)`` returns a RunConfig
that trains a tiny model on them. Must run in a process where
``megatron_asvr.runtime`` may be initialised (the tokenizer is a megatron
module): use ``multirank.run_ranks(make_tiny_run, 1, root)``.
"""

import dataclasses
from pathlib import Path

from megatron_asvr.config import (
    ASVRConfig,
    DataConfig,
    HeadConfig,
    LLMConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    VisionConfig,
)

VISION = VisionConfig(family="siglip", num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                      patch_size=32, image_size=384, feature_layer=-2)  # 144 patches per 384 tile
PATCHES = VISION.num_patches
SEQ_LENGTH = 256


def make_tiny_run(root: str) -> dict:
    """Write the corpus, tokenizer, shards and targets under ``root``; return their paths."""
    from demo.data import DemoConfig, make_demo_data
    from demo.encoder import write_demo_siglip
    from megatron_asvr import runtime
    from megatron_asvr.config.tools import PreprocessConfig
    from megatron_asvr.data.preprocess import preprocess
    from megatron_asvr.config.tools import TargetsConfig
    from megatron_asvr.data.precompute_targets import precompute_targets
    from megatron_asvr.config.tools import ValidationConfig
    from megatron_asvr.data.images import image_batches
    from megatron_asvr.config.tools import FitConfig
    from megatron_asvr.tokenizers.visual_fit import fit_visual_tokenizer

    root = Path(root)
    make_demo_data(root / "data", DemoConfig.tiny())
    write_demo_siglip(root / "encoder", VISION, blocks=2)
    runtime.initialize(ParallelConfig())
    fit_visual_tokenizer(FitConfig(
        images=root / "data/images/train", encoder=root / "encoder", output_dir=root / "tokenizer",
        depth=3, codebook_size=16, appearance_layer=1, seed_images=8, seed_iters=3, head_width=32,
        workers=0, backend="local", progress=False,
    ), image_batches)
    preprocess(PreprocessConfig(
        inputs=(("pretrain", root / "data/pretrain.json"),), output_dir=root / "shards",
        tokenizer=root / "data", template="plain",
        validation=ValidationConfig(image_root=root / "data/images", max_seq_length=SEQ_LENGTH,
                                    image_tokens=PATCHES),
        progress=False,
    ))
    precompute_targets(TargetsConfig(
        data=(root / "data/pretrain.json",), image_root=root / "data/images", output_dir=root / "targets",
        tokenizer_config=root / "tokenizer/config.json", tokenizer_checkpoint=root / "tokenizer/tokenizer.ckpt",
        mode="resize", precision="fp32", backend="local", workers=0, progress=False,
    ))
    runtime.destroy()
    return {"root": str(root)}


def tiny_run_config(root: str, save_dir: str, **train_changes) -> RunConfig:
    """Stage 2 (LLM, projector and head train) of a tiny model on ``make_tiny_run``'s files."""
    root = Path(root)
    model = ModelConfig(
        vision=VISION,
        llm=LLMConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=128, vocab_size=512, max_sequence_length=SEQ_LENGTH),
        asvr=ASVRConfig(head=HeadConfig(hidden_size=32, num_layers=2, num_attention_heads=4)),
        transformer_impl="local",
        trainable=["projector", "llm", "visual_head"],
    )
    data = DataConfig(shards=str(root / "shards"), image_root=str(root / "data/images"),
                      targets=str(root / "targets"), image_mode="resize", seq_length=SEQ_LENGTH, num_workers=0)
    train = TrainConfig(global_batch=4, micro_batch=1, steps=4, lr=1e-3, warmup_ratio=0.0,
                        visual_tokenizer=str(root / "tokenizer"), save_dir=str(save_dir), save_interval=0,
                        log_interval=1, tensorboard=False, precision="fp32")
    return RunConfig(model=model, parallel=ParallelConfig(), data=data,
                     train=dataclasses.replace(train, **train_changes))
