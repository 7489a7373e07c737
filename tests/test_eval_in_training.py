"""The in-training held-out score: logged to TensorBoard every eval_interval steps, equal to the
evaluation library's likelihood scores of the saved checkpoint, and without effect on training."""

import dataclasses
from pathlib import Path

import pytest

from tests.support.multirank import run_ranks
from tests.support.tiny_run import make_tiny_run, tiny_run_config
from megatron_asvr.config import ConfigError, ParallelConfig, TrainConfig

TP2 = ParallelConfig(tensor_parallel=2)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_run")
    run_ranks(make_tiny_run, 1, str(root), timeout=600)
    return root


def _train(config):
    from megatron_asvr.evaluation.in_training import train

    return train(config)


def _likelihood_scores(checkpoint: str, root: str) -> dict:
    """The held-out letter / yes-no questions scored by the evaluation library at TP=1."""
    from megatron_asvr.evaluation.in_training import true_choice_prob
    from megatron_asvr.evaluation.loading import ModelSpec, open_model
    from megatron_asvr.evaluation.suites.jsonl import read_jsonl_benchmark, score_jsonl

    data = read_jsonl_benchmark(Path(root) / "data/eval.jsonl", Path(root) / "data/images")
    items = [i for i in data.items if i.choices]
    with open_model(ModelSpec(checkpoint=Path(checkpoint), tokenizer=Path(root) / "data", dtype="fp32")) as loaded:
        answers = loaded.answerer.answer(items, "likelihood")
    scores = score_jsonl(items, {qid: a.text for qid, a in answers.items()})
    scores["true_choice_prob"] = sum(true_choice_prob(i, answers[i.question_id]) for i in items) / len(items)
    return scores


def test_held_out_score_is_logged_and_matches_the_evaluator(tiny_root, tmp_path):
    from megatron_asvr.evaluation.experiment import read_scalars

    root = tiny_root
    evaluated = dataclasses.replace(
        tiny_run_config(str(root), tmp_path / "with_eval", steps=4, eval_interval=2, tensorboard=True,
                        eval_data=str(root / "data/eval.jsonl"), eval_tokenizer=str(root / "data")),
        parallel=TP2)
    plain = dataclasses.replace(evaluated, train=dataclasses.replace(
        evaluated.train, eval_interval=0, save_dir=str(tmp_path / "without_eval")))
    with_eval = run_ranks(_train, 2, evaluated)[-1]
    without_eval = run_ranks(_train, 2, plain)[-1]
    assert with_eval["history"] == without_eval["history"]  # scoring changes nothing in training

    scalars = read_scalars(tmp_path / "with_eval/tensorboard")
    assert [step for step, _ in scalars["eval/accuracy"]] == [2, 4]
    logged = {tag.split("/", 1)[1]: values[-1][1] for tag, values in scalars.items() if tag.startswith("eval/")}
    expected = run_ranks(_likelihood_scores, 1, with_eval["checkpoint"], str(root))[0]
    assert set(logged) == set(expected) and "true_choice_prob" in logged
    assert logged == pytest.approx(expected, abs=1e-6)  # TensorBoard stores float32


def test_eval_interval_needs_its_files(tmp_path):
    with pytest.raises(ConfigError, match=r"train.eval_interval is set but train.eval_data=None does not exist"):
        TrainConfig(global_batch=4, micro_batch=1, eval_interval=5).validate()
    config = TrainConfig(global_batch=4, micro_batch=1, eval_interval=5, eval_data=str(tmp_path),
                         eval_tokenizer=str(tmp_path / "no_tokenizer"))
    with pytest.raises(ConfigError, match=r"train.eval_tokenizer=.*no_tokenizer' does not exist"):
        config.validate()
