"""Residual k-means visual tokenizer: k-means pieces, dead-code restart, and a fit on the demo corpus."""

import json
from pathlib import Path

import pytest
import torch

from tests.support.multirank import run_ranks
from tests.support.tools import load_tool
from megatron_asvr.tokenizers.visual_fit import ResidualKMeans, kmeans_plus_plus, lloyd_step, report_table
from megatron_asvr.tokenizers.visual_format import read_config

K, DEPTH = 16, 4


def _clusters(n_per: int = 50, seed: int = 0):
    """Four tight clusters far apart in 3-D: [4 * n_per, 3] points and [4, 3] true means."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]])
    points = (centers.repeat_interleave(n_per, 0) + 0.1 * torch.randn(4 * n_per, 3, generator=g))
    return points, points.reshape(4, n_per, 3).mean(dim=1)


def test_kmeans_plus_plus_seeds_every_cluster_and_lloyd_finds_the_means():
    points, means = _clusters()
    seeds = kmeans_plus_plus(points, 4, torch.Generator().manual_seed(1))
    assert all(any(torch.equal(s, p) for p in points) for s in seeds)  # seeds are data points
    owner = torch.cdist(seeds, means).argmin(dim=1)
    assert sorted(owner.tolist()) == [0, 1, 2, 3]  # one seed in each cluster
    centers = lloyd_step(points, seeds)
    torch.testing.assert_close(centers[owner.argsort()], means, atol=1e-6, rtol=0)


def test_unused_codes_restart_on_current_residuals():
    points, _ = _clusters()
    fit = ResidualKMeans(depth=2, size=4, restart_after=150, generator=torch.Generator().manual_seed(0))
    fit.seed(points, iters=5)
    fit.codebooks[0][3] = 1e6  # a code nothing is near
    batch = points[torch.randperm(200, generator=torch.Generator().manual_seed(2))[:100]]
    fit.update(batch)  # 100 vectors seen: not yet over the limit
    assert fit.restarts == [0, 0]
    fit.update(batch)  # 200 > 150 since its last use: restarted on one of this batch's vectors
    assert fit.restarts[0] == 1 and fit.codebooks[0][3].abs().max() < 20
    assert any(torch.equal(fit.codebooks[0][3], v) for v in batch)
    assert fit.counts[0][3] == 0 and fit.counts[0].sum() == 200  # the restarted code starts afresh


def test_mini_batch_update_moves_used_codes_to_the_running_mean():
    fit = ResidualKMeans(depth=1, size=2, restart_after=10**9, generator=torch.Generator().manual_seed(0))
    fit.codebooks = [torch.tensor([[0.0, 0.0], [10.0, 10.0]])]
    fit.counts = [torch.zeros(2, dtype=torch.float64)]
    fit.last_used = [torch.zeros(2, dtype=torch.long)]
    fit.update(torch.tensor([[1.0, 1.0], [3.0, 1.0]]))  # both to code 0: step 2/2 -> their mean
    assert fit.codebooks[0].tolist() == [[2.0, 1.0], [10.0, 10.0]]
    fit.update(torch.tensor([[4.0, 4.0], [4.0, 0.0]]))  # step 2/4: halfway to (4, 2)
    assert fit.codebooks[0].tolist() == [[3.0, 1.5], [10.0, 10.0]] and fit.counts[0].tolist() == [4.0, 0.0]


def _fit_and_reload(argv, images_dir, mode):
    """Fit with tools/fit_visual_tokenizer.py, reload the written files as a tokenizer, recount its codes."""

    from megatron_asvr import runtime
    from megatron_asvr.config import ParallelConfig
    from megatron_asvr.data.images import load_rgb, preprocess_image
    from megatron_asvr.tokenizers.visual_fit import list_images
    from megatron_asvr.tokenizers.visual import load_visual_tokenizer
    from megatron_asvr.tokenizers.visual_rq import code_counts, perplexity, relative_errors

    assert load_tool("fit_visual_tokenizer").main(argv) == 0
    output = Path(argv[argv.index("--output") + 1])
    report = json.loads((output / "fit_report.json").read_text())
    runtime.initialize(ParallelConfig())
    tokenizer = load_visual_tokenizer(report["config"], report["checkpoint"])
    images = torch.cat([preprocess_image(load_rgb(p), mode) for p in list_images(images_dir, None, 0)])
    images = images.to(runtime.current_device())
    semantic, appearance = tokenizer.features(images)
    recount = {}
    for branch, features in (("semantic", semantic), ("appearance", appearance)):
        quantizer = tokenizer.quantizers[branch]
        codes = tokenizer.codes(images, (branch,))[branch]
        recount[branch] = {
            "relative_error": relative_errors(quantizer.squared_errors(features, codes)),
            "perplexity": [perplexity(c) for c in code_counts(codes, quantizer.sizes)],
        }
    runtime.destroy()
    return report, recount


def test_fit_on_the_demo_corpus(tmp_path):
    import transformers

    from demo.data import DemoConfig, make_demo_data

    make_demo_data(tmp_path / "demo", DemoConfig.tiny())  # 12 training images
    torch.manual_seed(0)
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=384,
        patch_size=14)).save_pretrained(tmp_path / "siglip")
    images = tmp_path / "demo/images/train"
    argv = [f"--images={images}", f"--encoder={tmp_path / 'siglip'}", "--output", str(tmp_path / "fit"),
            f"--depth={DEPTH}", f"--codebook-size={K}", "--semantic-layer=-2", "--appearance-layer=1", "--epochs=2",
            "--batch-images=4", "--seed-images=4", "--seed-iters=5", "--workers=0", "--no-progress"]
    report, recount = run_ranks(_fit_and_reload, 1, argv, images, "resize")[0]

    assert report["images"] == 12 and report["undecodable"] == {}
    assert report["layers"] == {"semantic": 2, "appearance": 1}
    for branch in ("semantic", "appearance"):
        errors, ppl = report[branch]["relative_error"], report[branch]["perplexity"]
        unexplained = report[branch]["unexplained_variance"]
        assert len(errors) == len(ppl) == len(unexplained) == DEPTH
        assert ppl[0] >= K / 4, ppl
        for series in (errors, unexplained):
            assert all(later < earlier for earlier, later in zip(series, series[1:])), series
        assert errors[0] < unexplained[0] < 1.0
        # the written files give back exactly the fitted quantizer
        assert recount[branch]["perplexity"] == pytest.approx(ppl, rel=1e-12)
        assert recount[branch]["relative_error"] == pytest.approx(errors, rel=1e-6)
    fitted = read_config(tmp_path / "fit/config.json")  # what the targets tool and the model config read
    assert (fitted.semantic_layer, fitted.appearance_layer, fitted.codebook_sizes, fitted.code_width) == (
        2, 1, (K,) * DEPTH, 32)
    assert len(report_table(report).splitlines()) == 1 + 2 * DEPTH
