"""On a tiny random checkpoint: greedy decoding, answer likelihood and last-token attention at
TP / PP / DP layouts against a direct single-process forward, the HF-export path against ours,
and the evaluation and attention-map tools end to end."""

import dataclasses
from pathlib import Path

import pytest
import torch

from demo.data import DemoConfig, make_demo_data
from tests.support.multirank import run_ranks
from tests.support.tools import load_tool
from megatron_asvr.config import (
    ASVRConfig,
    CodebookSpec,
    HeadConfig,
    LLMConfig,
    ModelConfig,
    ParallelConfig,
    VisionConfig,
)
from megatron_asvr.data.sequence import SequenceTooLong
from megatron_asvr.evaluation.attention_map import last_row_attention
from megatron_asvr.evaluation import queries
from megatron_asvr.evaluation.queries import Query, to_sample
from megatron_asvr.tokenizers.templates import IMAGE_PLACEHOLDER

VISION = VisionConfig(family="siglip", num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                      patch_size=64, image_size=384, feature_layer=-2)  # 6 x 6 patches
MODEL = ModelConfig(
    vision=VISION,
    llm=LLMConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                  vocab_size=512, max_sequence_length=256, sliding_window=48, init_method_std=0.05),
    asvr=ASVRConfig(head=HeadConfig(hidden_size=32, num_layers=1, num_attention_heads=4),
                    semantic=CodebookSpec(sizes=[16, 16], dim=8)),
    transformer_impl="local",
)
GENERATED = 4  # questions decoded
NEW_TOKENS = 5
ID_TOL = 1e-3  # the reference's top-1 logit margin must exceed this for an id comparison to mean something
LAYOUT_TOL = 1e-5  # log-probabilities at another layout (fp32)
HF_TOL = 1e-4  # transformers vs ours (fp32), as the converter's tests


def _save_model(root: str) -> None:
    from megatron_asvr import runtime
    from megatron_asvr.checkpoint.model import build_chunks, save_model

    info = runtime.initialize(ParallelConfig(), seed=7)
    chunks = build_chunks(MODEL, ParallelConfig(), torch.float32, info.device)
    save_model(chunks, Path(root) / "ckpt", MODEL)
    runtime.destroy()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_model")
    make_demo_data(root / "data", DemoConfig.tiny())
    run_ranks(_save_model, 1, str(root))
    return root


def _spec(root, parallel, **changes):
    from megatron_asvr.config.tools import EvalModelConfig

    return EvalModelConfig(checkpoint=Path(root) / "ckpt", tokenizer=Path(root) / "data", template="vicuna_v1",
                     image_mode="pad", parallel=parallel, dtype="fp32", micro_batch=2, batch_size=3,
                     max_new_tokens=NEW_TOKENS, **changes)


def _items(root):
    from megatron_asvr.evaluation.suites.jsonl import read_jsonl_benchmark

    return read_jsonl_benchmark(Path(root) / "data/eval.jsonl", Path(root) / "data/images").items


def _generation_queries(root, encoder):
    """Ragged prompts: two questions, one text only, two that end in an image (their last image
    positions past the text-only prompt's end: fed to the cache by teacher forcing) and one anyres
    prompt of a wide image (several tiles), the longest. The second question and the two ending in an
    image share one image (one pixels tensor: the encoder keeps its recent images)."""
    import io

    from PIL import Image

    from megatron_asvr.evaluation.queries import Query, QueryEncoder

    items = _items(root)
    wide = io.BytesIO()
    Image.open(items[3].image).convert("RGB").resize((768, 384)).save(wide, format="PNG")
    anyres = QueryEncoder(encoder.tokenizer, encoder.template, "anyres", encoder.patches_per_tile, encoder.max_length)
    text = encoder.prompt(dataclasses.replace(items[1], image=None))
    pictured = encoder.prompt(items[1])
    ending = [Query(text.ids[:n] + [IMAGE_PLACEHOLDER], pictured.pixels, pictured.image_tokens, n + 1)
              for n in (text.length - VISION.num_patches + 3, text.length - VISION.num_patches + 5)]
    return ([encoder.prompt(item) for item in items[:2]] + [text] + ending
            + [anyres.prompt(dataclasses.replace(items[3], image=wide.getvalue()))])


def _generation_at(runner, encoder, root) -> dict:
    """Greedy ids of ``_generation_queries`` with and without the KV cache (this layout's data-parallel
    replicas share the queries); the EOS id is one the model generates early (not in the anyres
    prompt's first two), and the positions end two ids after the longest prompt. Counts the tiles
    the vision encoder saw (first stage)."""
    from megatron.core.utils import get_attr_wrapped_model

    queries = _generation_queries(root, encoder)
    rank, size = runner.data_parallel
    mine = list(range(rank, len(queries), size))
    encoder_module = get_attr_wrapped_model(runner.chunks[0], "vision_encoder")
    seen = []
    if encoder_module is not None:
        encoder_module.register_forward_hook(lambda module, args, output: seen.append((args[0].shape[0],
                                                                                      module.training)))

    def generate(kv_cache: bool, eos_id: int, max_length: int):
        runner.kv_cache, seen[:] = kv_cache, []
        ids = runner.generate([queries[i] for i in mine], NEW_TOKENS, eos_id, max_length)
        gathered = dict(runner.gather(list(zip(mine, ids))))
        assert not any(training for _, training in seen)  # eval mode: no dropout
        return [gathered[i] for i in range(len(queries))], sum(tiles for tiles, _ in seen)

    free, _ = generate(False, -1, encoder.max_length)
    eos = next(t for ids in free[:-1] for t in ids[1:] if t not in free[-1][:2])  # the anyres prompt's stay
    limit = max(q.length for q in queries) + 2
    (uncached, _), (cached, tiles) = generate(False, eos, limit), generate(True, eos, limit)
    runner.kv_cache = True
    pictured = [queries[i].pixels for i in mine if queries[i].pixels is not None]
    distinct = sum({id(p): p.shape[0] for p in pictured}.values())  # questions on one image share its pixels
    return {"free": free, "eos": eos, "uncached": uncached, "cached": cached,
            "lengths": [q.length for q in queries], "limit": limit, "anyres_tiles": queries[-1].pixels.shape[0],
            "tiles": (tiles, distinct, sum(p.shape[0] for p in pictured)) if encoder_module is not None else None}


def _evaluate_at(root: str, parallel: ParallelConfig, generation: bool = False) -> dict:
    """What every evaluation path returns at this layout (the same on every rank); with
    ``generation`` also ``_generation_at``'s ids."""
    from megatron_asvr.evaluation.attention_map import attention_map
    from megatron_asvr.evaluation.loading import open_model

    items = _items(root)
    with open_model(_spec(root, parallel)) as loaded:
        answerer = loaded.answerer
        cached_vs_uncached = _generation_at(answerer.runner, answerer.encoder, root) if generation else None
        ids = answerer.generate_ids(items[:GENERATED])
        chosen = answerer.choose([i for i in items if i.choices])
        answers = answerer.answer(items, "likelihood")
        attention = attention_map(answerer, items[0], layers=[2, 4], heads=[1, 3])
    return {"ids": ids, "logprobs": [a.logprobs for a in chosen], "answers": {k: a.text for k, a in answers.items()},
            "grid": torch.from_numpy(attention.grid), "share": attention.image_share, "answer": attention.answer,
            "generation": cached_vs_uncached}


@torch.no_grad()
def _direct_reference(root: str) -> dict:
    """The same numbers from single forward passes of the TP=1 model, without the schedule or the
    runner: greedy ids with each step's top-1 margin, answer log-probabilities, and a check that
    the recorded last-row attention reproduces every layer's core-attention output."""
    from megatron_asvr.evaluation.attention_map import LastTokenAttention
    from megatron_asvr.evaluation.loading import open_model

    items = _items(root)
    with open_model(_spec(root, ParallelConfig())) as loaded:
        chunk, encoder = loaded.answerer.runner.chunks[0].eval(), loaded.answerer.encoder
        vocab = loaded.answerer.runner.vocab_limit

        def logits(query):
            sample = to_sample(query, query.length)
            device = loaded.answerer.runner.device
            pixels = query.pixels.to(device) if query.pixels is not None else None
            return chunk(sample.tokens[None].to(device), torch.arange(query.length)[None].to(device),
                         image_index=sample.image_mask.nonzero().squeeze(1).to(device),
                         images=pixels)["logits"][0, :, :vocab]  # [s, V]

        ids, margins = [], []
        for item in items[:GENERATED]:
            query, generated = encoder.prompt(item), []
            for _ in range(NEW_TOKENS):
                top = logits(query)[query.length - 1].topk(2)
                margins.append((top.values[0] - top.values[1]).item())
                token = int(top.indices[0])
                if token == encoder.tokenizer.eos_id:
                    break
                generated.append(token)
                query = query.extended(token)
            ids.append(generated)
        logprobs = []
        for item in [i for i in items if i.choices]:
            row = []
            for query in encoder.answers(item, list(item.choices)):
                sample = to_sample(query, query.length)
                expanded = query.length - len(query.ids)  # image positions added before the answer
                steps = torch.log_softmax(logits(query), -1)  # [s, V]
                positions = [i + expanded - 1 for i in range(query.scored_from, len(query.ids))]
                row.append(sum(steps[p, query.ids[p - expanded + 1]].item() for p in positions))
                assert sample.loss_mask.nonzero().squeeze(-1).tolist() == positions
            logprobs.append(tuple(row))

        recorder, outputs = LastTokenAttention([chunk]), {}
        handles = [layer.self_attention.core_attention.register_forward_hook(
            lambda m, args, out, n=layer.layer_number: outputs.__setitem__(n, (args, out)))
            for layer in chunk.language_model.decoder.layers]
        logits(encoder.prompt(items[0]))
        recorder.remove()
        for handle in handles:
            handle.remove()
        reproduced = []
        for number, (args, out) in outputs.items():
            value = args[2].repeat_interleave(args[0].shape[2] // args[2].shape[2], dim=2)  # [s, b, np, d]
            context = torch.einsum("bns,sbnd->bnd", recorder.maps[number], value)  # [b, np, d]
            reproduced.append((context.reshape(1, -1) - out[-1]).abs().max().item())
    return {"ids": ids, "margins": margins, "logprobs": logprobs, "attention_error": max(reproduced),
            "row_sums": [m.sum(-1) for m in recorder.maps.values()]}


def test_query_expansion_and_answer_span(root, monkeypatch):
    query = Query([1, 5, IMAGE_PLACEHOLDER, 7, 9], None, [3], scored_from=4)
    sample = to_sample(query, 10)
    assert query.length == 7
    assert sample.tokens.tolist() == [1, 5, 0, 0, 0, 7, 9, 0, 0, 0]
    assert sample.image_mask.tolist() == [False, False, True, True, True] + [False] * 5
    assert sample.labels[5].item() == 9 and sample.loss_mask.nonzero().squeeze(-1).tolist() == [5]

    from megatron_asvr.evaluation.queries import QueryEncoder
    from megatron_asvr.tokenizers.text import load_text_tokenizer

    tokenizer = load_text_tokenizer(root / "data")
    item = _items(root)[2]  # a letter question
    encoder = QueryEncoder(tokenizer, "vicuna_v1", "pad", VISION.num_patches, MODEL.llm.max_sequence_length)
    prompt = encoder.prompt(item)
    [answer] = encoder.answers(item, ["B"])
    assert answer.ids[: len(prompt.ids)] == prompt.ids and answer.scored_from == len(prompt.ids)
    assert tokenizer.decode(answer.ids[answer.scored_from:]) == "B" and answer.ids[-1] == tokenizer.eos_id
    assert prompt.ids.count(IMAGE_PLACEHOLDER) == 1 and prompt.image_tokens == [VISION.num_patches]
    assert tokenizer.decode([t for t in prompt.ids if t >= 0]).endswith(item.prompt + " ASSISTANT:")
    short = QueryEncoder(tokenizer, "vicuna_v1", "pad", VISION.num_patches, prompt.length - 1)
    with pytest.raises(SequenceTooLong, match=rf"question {item.question_id}: {prompt.length} positions .* exceed"):
        short.prompt(item)
    # the encoder keeps its last IMAGE_MEMO images: a question on the same image shares the pixels tensor
    again = encoder.prompt(dataclasses.replace(item, question_id="again", prompt="Is it red?"))
    assert again.pixels is prompt.pixels
    monkeypatch.setattr(queries, "IMAGE_MEMO", 2)  # the tiny data has 4 images
    others = list({i.image: i for i in _items(root) if i.image not in (None, item.image)}.values())[:2]
    for other in others:  # IMAGE_MEMO other images: the first one is forgotten, decoded again when asked
        encoder.prompt(other)
    assert len(others) == 2
    assert encoder.prompt(item).pixels is not prompt.pixels and torch.equal(encoder.prompt(item).pixels, prompt.pixels)


def test_replicas_share_questions_by_image_runs():
    from megatron_asvr.evaluation.answerer import replica_share
    from megatron_asvr.evaluation.items import EvalItem

    images = [Path("a"), Path("a"), Path("a"), Path("b"), None, None, Path("c"), Path("c"), Path("a")]
    items = [EvalItem(str(i), "q", image, "", "short") for i, image in enumerate(images)]
    shares = [[item.question_id for item in replica_share(items, rank, 2)] for rank in range(2)]
    assert shares == [["0", "1", "2", "4", "6", "7"], ["3", "5", "8"]]  # runs: a a a | b | - | - | c c | a
    assert [i.question_id for i in replica_share(items, 0, 1)] == [str(i) for i in range(9)]


def test_last_row_attention_matches_sdpa_with_window():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, 2, h, 8, generator=g) for h in (4, 2, 2))  # [s, b, heads, d], 2 query groups
    probs = last_row_attention(q, k, 0.3, window_left=4)  # [b, 4, 9]
    mask = torch.zeros(9, dtype=torch.bool)
    mask[4:] = True  # the last position sees itself and the 4 before it
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3)[:, :, -1:], k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=mask[None], scale=0.3,
        enable_gqa=True)[:, :, 0]  # [b, 4, d]
    got = torch.einsum("bns,sbnd->bnd", probs, v.repeat_interleave(2, dim=2))
    assert (got - expected).abs().max().item() < 1e-6
    assert probs[..., :4].abs().max().item() == 0.0 and torch.allclose(probs.sum(-1), torch.ones(2, 4))
    # A padded forward (sequence parallelism rounds the length up): the row of the prompt's last position.
    padded = [torch.cat([t, torch.randn(3, *t.shape[1:], generator=g)]) for t in (q, k)]
    assert torch.equal(last_row_attention(*padded, 0.3, window_left=4, row=8), probs)


def _flat(logprobs) -> torch.Tensor:
    return torch.tensor([v for row in logprobs for v in row])


def _check_generation(result: dict) -> None:
    """Cached and uncached greedy ids are the same, and both are the free-running ids cut at the EOS
    and at the positions' end: a ragged batch (text only to anyres), early EOS, ended rows."""
    free, eos, lengths = result["free"], result["eos"], result["lengths"]
    expected = [ids[: ids.index(eos) if eos in ids else len(ids)][: result["limit"] - n]
                for ids, n in zip(free, lengths)]
    assert result["cached"] == result["uncached"] == expected
    assert any(eos in ids[:-1] for ids in free) and len(expected[-1]) == 2 < len(free[-1])  # EOS; the positions' end
    assert len(set(lengths)) == len(lengths) and lengths[-1] == max(lengths) and result["anyres_tiles"] >= 3
    if result["tiles"] is not None:  # the vision encoder saw each distinct image's tiles once
        seen, distinct, per_query = result["tiles"]
        assert seen == distinct > 0 and per_query >= distinct


def test_layouts_agree_with_direct_forward(root):
    reference = run_ranks(_direct_reference, 1, str(root))[0]
    assert min(reference["margins"]) > ID_TOL
    assert reference["attention_error"] < 1e-5
    assert all(torch.allclose(s, torch.ones_like(s)) for s in reference["row_sums"])
    tp1 = run_ranks(_evaluate_at, 1, str(root), ParallelConfig(), True)[0]
    assert tp1["ids"] == reference["ids"] and all(len(ids) > 0 for ids in tp1["ids"])
    _check_generation(tp1["generation"])
    seen, distinct, per_query = tp1["generation"]["tiles"]
    assert seen < per_query  # three questions on items[1]'s image: its tiles encoded once
    assert _flat(tp1["logprobs"]).sub(_flat(reference["logprobs"])).abs().max() < LAYOUT_TOL
    assert abs(tp1["grid"].sum().item() - tp1["share"]) < 1e-6  # one tile: the grid is all image positions
    layouts = ((ParallelConfig(pipeline_parallel=2), 2), (ParallelConfig(pipeline_parallel=2, virtual_pipeline=2), 2),
               (ParallelConfig(tensor_parallel=2, sequence_parallel=True), 4))  # TP=2 on 4 ranks: DP=2
    for parallel, ranks in layouts:
        for result in run_ranks(_evaluate_at, ranks, str(root), parallel, True):
            _check_generation(result["generation"])
            assert result["generation"]["free"] == tp1["generation"]["free"]
            assert result["ids"] == tp1["ids"] and result["answers"] == tp1["answers"]
            assert result["answer"] == tp1["answer"]
            assert _flat(result["logprobs"]).sub(_flat(tp1["logprobs"])).abs().max() < LAYOUT_TOL
            assert (result["grid"] - tp1["grid"]).abs().max() < 1e-6 and abs(result["share"] - tp1["share"]) < 1e-6


def _hf_against_ours(root: str) -> dict:
    from megatron_asvr import runtime
    from megatron_asvr.config.tools import ExportOptions
    from megatron_asvr.convert.hf_export import export_hf
    from megatron_asvr.evaluation.loading import open_model

    info = runtime.initialize(ParallelConfig())
    export_hf(Path(root) / "ckpt", Path(root) / "hf", ParallelConfig(), ExportOptions(dtype="fp32", progress=False),
              info.device)
    runtime.destroy()
    items = _items(root)
    results = {}
    ours = _spec(root, ParallelConfig())
    hf = dataclasses.replace(ours, checkpoint=None, hf_model=Path(root) / "hf")
    for name, spec in (("ours", ours), ("hf", hf)):
        with open_model(spec) as loaded:
            results[name] = {"ids": loaded.answerer.generate_ids(items[:GENERATED]),
                             "logprobs": [a.logprobs for a in loaded.answerer.choose([i for i in items if i.choices])]}
    return results


def test_hf_export_path_matches_ours(root):
    results = run_ranks(_hf_against_ours, 1, str(root))[0]
    assert results["hf"]["ids"] == results["ours"]["ids"]
    ours, hf = _flat(results["ours"]["logprobs"]), _flat(results["hf"]["logprobs"])
    assert (ours - hf).abs().max() < HF_TOL


def _tool(name: str):
    return load_tool(name)


def _run_tool(name: str, argv) -> None:
    _tool(name).main(argv)


def test_evaluate_tool_writes_table_and_json(root):
    import json

    from megatron_asvr.evaluation.suites.jsonl import score_jsonl
    from megatron_asvr.tokenizers.text import load_text_tokenizer

    out = root / "eval_pp2"
    argv = ["--checkpoint", str(root / "ckpt"), "--pp", "2", "--tokenizer", str(root / "data"), "--template",
            "vicuna_v1", "--image-mode", "pad", "--benchmark", f"jsonl={root / 'data/eval.jsonl'}", "--image-root",
            f"jsonl={root / 'data/images'}", "--max-new-tokens", str(NEW_TOKENS), "--out", str(out), "--dtype", "fp32"]
    run_ranks(_run_tool, 2, "evaluate", argv)
    results = json.loads((out / "results.json").read_text())["benchmarks"]["jsonl"]
    rows = [json.loads(line) for line in (out / "predictions_jsonl.jsonl").read_text().splitlines()]
    items = _items(root)
    assert results["questions"] == len(items) == len(rows) and results["methods"] == {"generate": len(items)}
    reference = run_ranks(_evaluate_at, 1, str(root), ParallelConfig())[0]
    tokenizer = load_text_tokenizer(root / "data")
    assert [r["prediction"] for r in rows[:GENERATED]] == [tokenizer.decode(ids).strip() for ids in reference["ids"]]
    assert results["metrics"] == score_jsonl(items, {r["question_id"]: r["prediction"] for r in rows})
    table = (out / "results.txt").read_text().splitlines()
    assert table[0].startswith("model: ") and table[3].split()[:3] == ["jsonl", str(len(items)), "accuracy"]
    assert float(table[3].split()[-1]) == pytest.approx(results["metrics"]["accuracy"], abs=5e-5)


def test_evaluate_tool_prints_the_paper_table(root):
    """``--suite paper14`` on a tiny set of each of the 14 benchmarks (letters and yes / no by
    likelihood, the rest generated): every row's value is its benchmark's headline (re-scored from
    the predictions), in the paper's order, and the average is the mean of the rows' percentages."""
    import json
    from statistics import fmean

    from tests.support.benchmark_files import write_paper14
    from megatron_asvr.evaluation.paper_table import PAPER14
    from megatron_asvr.config.tools import EvalBenchmarkConfig
    from megatron_asvr.evaluation.run import read_benchmark
    from megatron_asvr.evaluation.suites import get_benchmark

    files, out = write_paper14(root / "paper14"), root / "eval_paper14"
    argv = ["--checkpoint", str(root / "ckpt"), "--suite", "paper14", "--method", "likelihood", "--tokenizer",
            str(root / "data"), "--template", "vicuna_v1", "--image-mode", "pad", "--max-new-tokens", str(NEW_TOKENS),
            "--out", str(out), "--dtype", "fp32"]
    for name, (path, images) in files.items():
        argv += ["--benchmark", f"{name}={path}"] + (["--image-root", f"{name}={images}"] if images else [])
    run_ranks(_run_tool, 1, "evaluate", argv)
    summary = json.loads((out / "results.json").read_text())
    suite, benchmarks = summary["suite"], summary["benchmarks"]
    assert suite["missing"] == [] and [r["benchmark"] for r in suite["rows"]] == [row.name for row in PAPER14]
    for row in suite["rows"]:
        name, result = row["benchmark"], benchmarks[row["benchmark"]]
        items = read_benchmark(EvalBenchmarkConfig(name, *files[name])).items
        lines = (out / f"predictions_{name}.jsonl").read_text().splitlines()
        predictions = {r["question_id"]: r["prediction"] for r in map(json.loads, lines)}
        assert result["metrics"] == get_benchmark(name).score(items, predictions)
        assert row["value"] == result["value"] and row["questions"] == result["questions"] == len(items)
    percent = {r["benchmark"]: r["percent"] for r in suite["rows"]}
    assert percent["mme"] == pytest.approx(benchmarks["mme"]["value"] / 2)  # one subtask: out of 200
    assert percent["ocrbench"] == pytest.approx(100 * benchmarks["ocrbench"]["value"] / 2)  # 2 questions
    assert percent["mmmu"] == pytest.approx(100 * benchmarks["mmmu"]["value"])
    assert suite["average"] == pytest.approx(fmean(percent.values()))
    table = (out / "results.txt").read_text().splitlines()
    start = table.index("paper table (paper14): 14 of 14 benchmarks")
    assert [line.split("  ")[0] for line in table[start + 3:start + 17]] == [row.label for row in PAPER14]
    assert table[start + 17].split()[-1] == f"{suite['average']:.2f}"


def test_evaluate_tool_compares_kv_cache(root):
    """``--compare-kv-cache``: both paths' answers to the same questions agree; the table and JSON."""
    import json

    out = root / "eval_kv"
    argv = ["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "data"), "--template", "vicuna_v1",
            "--image-mode", "pad", "--benchmark", f"jsonl={root / 'data/eval.jsonl'}", "--image-root",
            f"jsonl={root / 'data/images'}", "--max-new-tokens", str(NEW_TOKENS), "--limit", "5", "--out", str(out),
            "--dtype", "fp32", "--compare-kv-cache"]
    run_ranks(_run_tool, 1, "evaluate", argv)
    [row] = json.loads((out / "kv_cache_comparison.json").read_text())["rows"]
    assert row["benchmark"] == "jsonl" and row["questions"] == row["same_answers"] == 5
    assert row["speedup"] == pytest.approx(row["uncached_s"] / row["cached_s"])
    assert not (out / "results.json").exists()  # a timing, not an evaluation


def test_evaluate_tool_names_a_missing_benchmark(root):
    with pytest.raises(SystemExit, match=r"evaluate: error: benchmark pope: .*nowhere.json does not exist"):
        _tool("evaluate").main(["--checkpoint", str(root / "ckpt"), "--benchmark", f"pope={root / 'nowhere.json'}",
                                "--out", str(root / "x")])


def test_evaluate_tool_suite_takes_only_its_benchmarks(root):
    with pytest.raises(SystemExit, match=r"evaluate: error: suite paper14 takes the benchmarks textvqa, .* 'jsonl' is"):
        _tool("evaluate").main(["--checkpoint", str(root / "ckpt"), "--suite", "paper14", "--benchmark",
                                f"jsonl={root / 'data/eval.jsonl'}", "--out", str(root / "x")])


def test_attention_map_tool_writes_overlay_png(root):
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    from megatron_asvr.evaluation import heatmap, plot

    item = _items(root)[0]
    out = root / "attention.png"
    run_ranks(_run_tool, 2, "attention_map", [
        "--checkpoint", str(root / "ckpt"), "--tp", "2", "--tokenizer", str(root / "data"), "--template", "vicuna_v1",
        "--image-mode", "pad", "--image", str(item.image), "--question", item.prompt, "--out", str(out),
        "--max-new-tokens", str(NEW_TOKENS), "--dtype", "fp32"])
    png = Image.open(out)
    assert png.size == tuple(round(inches * plot.DPI) for inches in heatmap.FIGURE_INCHES)
    pixels = np.asarray(png.convert("RGB")).astype(int)
    for level in (0.3, 0.7):  # the colour bar shows the colormap unblended
        color = np.array(colormaps[heatmap.COLORMAP](level)[:3]) * 255
        assert (np.abs(pixels - color).max(-1) <= 3).sum() > 20


def test_render_overlays_attention_on_the_image():
    import numpy as np
    from PIL import Image

    from megatron_asvr.evaluation import heatmap
    from megatron_asvr.evaluation.attention_map import AttentionMap

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8))
    grid = np.arange(36, dtype=np.float64).reshape(6, 6) / 1000  # 6 x 6 patches of 64 pixels
    result = AttentionMap("What color is the circle?", "Red", grid, [1, 2, 3, 4], [0, 1], 0.25)
    figure = heatmap.render(image, result, "pad", 64)
    axes, bar = figure.axes
    photo, heat = axes.get_images()
    assert np.array_equal(photo.get_array(), np.asarray(image))
    expected = heatmap.heat_on_image(grid, 200, 120, "pad", 64)  # [120, 200]
    assert heat.get_array().shape == (120, 200) and np.allclose(heat.get_array(), expected)
    # pad: the 200-wide image is the middle 120 rows of a 200 x 200 square over the 6 x 6 patches
    assert expected[0, 0] == pytest.approx(grid[1, 0], abs=0.004) and expected[-1, -1] > grid[4, 5] - 0.004
    assert heat.get_alpha() == heatmap.ALPHA and heat.cmap.name == heatmap.COLORMAP
    assert heat.get_clim() == (0.0, 0.035) and bar.get_ylim() == pytest.approx((0.0, 0.035))
    assert axes.get_title(loc="left") == "Q: What color is the circle?\nA: Red"
    assert axes.get_xlabel() == "mean of layers 1-4 x 2 heads; 25.0% of the attention on the image"


def test_attention_map_tool_names_missing_layers(root):
    from tests.support.multirank import MultiRankError

    item = _items(root)[0]
    message = r"attention_map: error: layers \[9\] do not exist \(the model has layers 1..4\)"
    with pytest.raises(MultiRankError, match=message):
        run_ranks(_run_tool, 1, "attention_map", [
            "--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "data"), "--template", "vicuna_v1",
            "--image-mode", "pad", "--image", str(item.image), "--question", "Where?", "--out", str(root / "x.png"),
            "--layers", "2,9"])
