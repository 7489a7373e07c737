"""The in-training held-out score: logged to TensorBoard every eval_interval steps, equal to scores
computed here by hand from the saved checkpoint's logits, and without effect on training."""

import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from megatron_asvr.config import ConfigError, ParallelConfig, TrainConfig
from tests.support.multirank import run_ranks
from tests.support.tiny_run import tiny_run_config

TP2 = ParallelConfig(tensor_parallel=2)


def _train(config):
    from megatron_asvr import training
    from megatron_asvr.evaluation.in_training import HeldOutScore

    return training.run(config, evaluator=HeldOutScore(config) if config.train.eval_interval else None)


@torch.no_grad()
def _candidate_logprobs(checkpoint: str, config) -> dict:
    """question id -> the summed log-probability of each candidate answer's ids after its prompt, from
    one forward pass per candidate of the checkpoint's TP=1 model (no schedule, runner or answerer)."""
    from megatron_asvr import runtime
    from megatron_asvr.checkpoint.model import load_model, read_model_config
    from megatron_asvr.evaluation.loading import evaluation_model_config
    from megatron_asvr.evaluation.queries import QueryEncoder, to_sample
    from megatron_asvr.evaluation.suites.jsonl import read_jsonl_benchmark
    from megatron_asvr.tokenizers.text import load_text_tokenizer

    info = runtime.initialize(ParallelConfig())
    model = evaluation_model_config(read_model_config(checkpoint), checkpoint)
    [chunk] = load_model(Path(checkpoint), model, ParallelConfig(), torch.float32, info.device)
    tokenizer = load_text_tokenizer(config.train.eval_tokenizer)
    template = json.loads((Path(config.data.shards) / "manifest.json").read_text())["metadata"]["template"]
    encoder = QueryEncoder(tokenizer, template, config.data.image_mode, model.vision.num_patches,
                           model.llm.max_sequence_length)
    vocab = min(model.llm.vocab_size, tokenizer.vocab_size)
    items = read_jsonl_benchmark(Path(config.train.eval_data), Path(config.data.image_root)).items
    out = {}
    for item in (i for i in items if i.choices):
        row = []
        for query in encoder.answers(item, list(item.choices)):
            sample, device = to_sample(query, query.length), info.device
            logits = chunk.eval()(sample.tokens[None].to(device), torch.arange(query.length)[None].to(device),
                                  image_index=sample.image_mask.nonzero().squeeze(1).to(device),
                                  images=query.pixels.to(device))["logits"][0, :, :vocab]  # [s, V]
            steps = torch.log_softmax(logits.double(), -1)
            expanded = query.length - len(query.ids)  # image positions added before the answer
            answer = range(query.scored_from, len(query.ids))
            row.append(sum(steps[i + expanded - 1, query.ids[i]].item() for i in answer))
        out[item.question_id] = row
    runtime.destroy()
    return out


def _expected_scores(logprobs: dict, eval_jsonl: Path) -> dict:
    """accuracy, chance and majority overall and per category, and true_choice_prob, from the
    candidates' log-probabilities and the eval file's records alone."""
    records = [json.loads(line) for line in eval_jsonl.read_text().splitlines() if line.strip()]
    per_name, by_category = defaultdict(list), defaultdict(list)
    for record in records:
        if record["question_id"] in logprobs:
            by_category[record.get("category", "")].append(record)
    probs = []
    for category, group in sorted(by_category.items()):
        golds = []
        for record in group:
            options = record.get("options")
            if options:  # the demo's letter questions give the letter
                gold, candidates = record["answer"], list("ABCDEFGHIJ"[:len(options)])
            else:
                gold, candidates = record["answer"].strip().lower(), ["yes", "no"]
            golds.append(gold)
            row = logprobs[record["question_id"]]
            best = max(range(len(row)), key=lambda i: (row[i], -i))  # the first of equals
            per_name[(category, "accuracy")].append(float(candidates[best] == gold))
            weights = [math.exp(v - max(row)) for v in row]
            probs.append(weights[candidates.index(gold)] / sum(weights))
        open_answers = {g for g, r in zip(golds, group) if not r.get("options")}
        top = max(golds, key=lambda g: (golds.count(g), -golds.index(g)))
        for gold, record in zip(golds, group):
            per_name[(category, "chance")].append(1 / len(record["options"]) if record.get("options")
                                                  else 1 / len(open_answers))
            per_name[(category, "majority")].append(float(gold == top))
    expected = {}
    for name in ("accuracy", "chance", "majority"):
        values = [v for (_, n), vs in per_name.items() if n == name for v in vs]
        expected[name] = sum(values) / len(values)
        for category in by_category:
            if category:
                expected[f"{category}/{name}"] = sum(per_name[(category, name)]) / len(per_name[(category, name)])
    expected["true_choice_prob"] = sum(probs) / len(probs)
    return expected


def test_held_out_score_is_logged_and_matches_the_checkpoints_logits(tiny_root, tmp_path):
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
    logprobs = run_ranks(_candidate_logprobs, 1, with_eval["checkpoint"], evaluated)[0]
    expected = _expected_scores(logprobs, root / "data/eval.jsonl")
    assert set(logged) == set(expected) and "true_choice_prob" in logged and len(logprobs) >= 4
    assert logged == pytest.approx(expected, abs=1e-5)  # TensorBoard stores float32; TP=2 against TP=1


def test_eval_interval_needs_its_files(tmp_path):
    with pytest.raises(ConfigError, match=r"train.eval_interval is set but train.eval_data=None does not exist"):
        TrainConfig(global_batch=4, micro_batch=1, eval_interval=5).validate()
    config = TrainConfig(global_batch=4, micro_batch=1, eval_interval=5, eval_data=str(tmp_path),
                         eval_tokenizer=str(tmp_path / "no_tokenizer"))
    with pytest.raises(ConfigError, match=r"train.eval_tokenizer=.*no_tokenizer' does not exist"):
        config.validate()
