"""The demo's image path learns: a tiny VLM trained for 150 steps on one question kind
(the colour of the only shape in the image) answers held-out images far above chance.

The pipeline is the demo's at test size: the demo corpus, the demo encoder imported as the
vision tower (tools/convert.py's import), preprocessed shards, the trainer, greedy answers
from the evaluation library. Nothing but the image tells the colour, so a change that cuts
or scrambles the image path (features, projector, image-token placement, the device move)
leaves the answers at chance and fails here.
"""

import json
from pathlib import Path

import pytest

from tests.support.multirank import run_ranks
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

VISION = VisionConfig(family="siglip", num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=256,
                      patch_size=128, image_size=384, feature_layer=-2)  # 9 patches, as the demo's
SEQ_LENGTH = 320
STEPS = 150
COLOURS = 6  # chance: 1/6


def _model() -> ModelConfig:
    return ModelConfig(
        vision=VISION,
        llm=LLMConfig(num_layers=2, hidden_size=128, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=320,
                      vocab_size=512, max_sequence_length=SEQ_LENGTH),
        asvr=ASVRConfig(visual_loss=False, head=HeadConfig(hidden_size=32, num_layers=1, num_attention_heads=4)),
        transformer_impl="local",
        trainable=["projector", "llm"],
    )


def _prepare(root: str) -> None:
    """Corpus (one shape per image, colour questions only), encoder, import, shards."""
    import torch

    from demo.data import DemoConfig, make_demo_data
    from demo.encoder import write_demo_siglip
    from megatron_asvr import runtime
    from megatron_asvr.config.tools import ImportSources
    from megatron_asvr.convert.hf_import import import_hf
    from megatron_asvr.config.tools import PreprocessConfig, ValidationConfig
    from megatron_asvr.data.preprocess import preprocess

    root = Path(root)
    make_demo_data(root / "data", DemoConfig(train_images=160, eval_images=48, max_objects=1, centered=True,
                                             categories=("color",),
                                             eval_questions_per_image=1, text_only_fraction=0.0,
                                             language_records=1, vocab_size=512))
    write_demo_siglip(root / "encoder", VISION)
    runtime.initialize(ParallelConfig())
    import_hf(ImportSources(vision=root / "encoder"), root / "init", ParallelConfig(),
              _model(), torch.float32, runtime.current_device(), progress=False)
    preprocess(PreprocessConfig(
        inputs=(("instruct", root / "data/instruct.json"),), output_dir=root / "shards", tokenizer=root / "data",
        template="vicuna_v1", progress=False,
        validation=ValidationConfig(image_root=root / "data/images", max_seq_length=SEQ_LENGTH,
                                    image_tokens=VISION.num_patches),
    ))
    runtime.destroy()


def _train(root: str, save_dir: str) -> dict:
    from megatron_asvr.training import run

    root = Path(root)
    config = RunConfig(
        model=_model(), parallel=ParallelConfig(),
        data=DataConfig(shards=str(root / "shards"), image_root=str(root / "data/images"), image_mode="resize",
                        seq_length=SEQ_LENGTH, num_workers=0),
        train=TrainConfig(global_batch=16, micro_batch=8, steps=STEPS, lr=2e-3, min_lr=1e-3, warmup_ratio=0.05,
                          adam_eps=1e-6, load=str(root / "init"), save_dir=save_dir, save_interval=0, log_interval=10,
                          tensorboard=False, precision="fp32"),
    )
    return run(config)


def _greedy_answers(checkpoint: str, root: str) -> tuple:
    """(scores, [(gold, greedy answer)] per held-out question)."""
    from megatron_asvr.config.tools import EvalModelConfig
    from megatron_asvr.evaluation.loading import open_model
    from megatron_asvr.evaluation.suites.jsonl import read_jsonl_benchmark, score_jsonl

    data = read_jsonl_benchmark(Path(root) / "data/eval.jsonl", Path(root) / "data/images")
    with open_model(EvalModelConfig(checkpoint=Path(checkpoint), tokenizer=Path(root) / "data", dtype="fp32",
                              max_new_tokens=8)) as loaded:
        answers = loaded.answerer.answer(data.items, "generate")
    texts = {qid: a.text for qid, a in answers.items()}
    return score_jsonl(data.items, texts), [(item.answer, texts[item.question_id]) for item in data.items]


def test_colour_of_the_only_shape_is_learned_from_the_image(tmp_path):
    run_ranks(_prepare, 1, str(tmp_path), timeout=300)
    questions = [json.loads(line) for line in (tmp_path / "data/eval.jsonl").read_text().splitlines()]
    assert {q["category"] for q in questions} == {"color"} and len(questions) == 48
    result = run_ranks(_train, 1, str(tmp_path), str(tmp_path / "run"), timeout=600)[0]
    losses = [step["loss/text"] for step in result["history"]]
    assert len(losses) == STEPS and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    scores, answers = run_ranks(_greedy_answers, 1, result["checkpoint"], str(tmp_path), timeout=300)[0]
    print(f"held-out colour accuracy after {STEPS} steps: {scores['color/accuracy']:.3f} (chance {1 / COLOURS:.3f})")
    assert scores["color/chance"] == pytest.approx(1 / COLOURS)
    assert scores["color/accuracy"] >= 3 / COLOURS, (scores, answers[:12])  # chance 1/6; majority answer well below 1/2
    assert scores["color/majority"] < 0.4
