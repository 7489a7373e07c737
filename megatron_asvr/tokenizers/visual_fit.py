"""Fit a visual tokenizer for any SigLIP encoder by residual k-means, saved in DualToken's format.

Both of DualToken's branches are fitted from one encoder pass per batch: the
semantic codes over the output of ``semantic_layer`` (HF ``hidden_states`` index,
negative from the end) and the appearance codes over ``appearance_layer`` (the
appearance projection of a fitted tokenizer is the identity). Per branch, D
codebooks of K codes:

1. seed: the features of the first ``seed_images`` images; depth by depth,
   k-means++ picks K codes among the residuals, ``seed_iters`` Lloyd iterations
   refine them, and the residuals left by them seed the next depth;
2. stream: ``epochs`` shuffled passes over all images in mini-batches; each depth
   assigns its residuals and moves every code it used toward their mean with
   step n_j / N_j (n_j vectors now, N_j in total: mini-batch k-means), and a code
   unused for ``restart_after`` vectors restarts on a random current residual;
3. evaluate: one pass quantizes every image with the final codebooks and reports,
   per depth, the relative reconstruction error (sum ||x - x_hat||^2 / sum ||x||^2),
   the unexplained variance (the same over sum ||x - mean||^2) and the code-usage
   perplexity.

The output directory holds ``config.json`` + ``tokenizer.ckpt`` (the released
layout, loaded by ``load_visual_tokenizer`` like DualToken) and ``fit_report.json``.
The images are read by the caller's ``read_images`` (``data.images.image_batches``: the
data layer, above this one, decodes and preprocesses them).
"""

import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from megatron_asvr.config import ParallelConfig
from megatron_asvr.config.tools import FitConfig
from megatron_asvr.model.canonical import load_full_state
from megatron_asvr.model.hf_vision import find_prefix, hf_vision_to_canonical
from megatron_asvr.model.specs import resolve_backend
from megatron_asvr.runtime import current_device
from megatron_asvr.tokenizers.visual import AppearanceProjection, TappedVisionEncoder
from megatron_asvr.tokenizers.visual_format import (
    BRANCHES,
    DualTokenConfig,
    TokenizerFileError,
    save_dualtoken,
    vision_config_from_hf,
)
from megatron_asvr.tokenizers.visual_rq import (
    ResidualQuantizer,
    code_counts,
    nearest_codes,
    perplexity,
    relative_errors,
)

# (paths, mode, batch_images, workers) -> batches of (position, tiles [T, 3, 384, 384] or None, error or
# None): ``data.images.image_batches``
ImageBatches = Callable[[Sequence[Path], str, int, int], Iterator[list]]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
REPORT_FILE = "fit_report.json"
# A code restarts after 400 x K vectors without use (400 times its fair share): on the demo corpus
# (K = 256, 500 images) 20 x K restarted ~3000 codes and left depth 0 with error 0.0127 and
# perplexity 56; 400 x K restarted 26 and reached 0.0071 and 98; never restarting, 0.0069 and 103
# at depth 0 but lower perplexity from depth 2 on.
RESTART_AFTER_SHARES = 400


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: x [n, C] -> k rows of x, each drawn with probability ~ squared distance to the chosen."""
    n = x.shape[0]
    centers = x.new_empty(k, x.shape[1])  # [k, C]
    centers[0] = x[torch.randint(n, (1,), generator=generator, device=x.device)]
    closest = (x - centers[0]).pow(2).sum(dim=1)  # [n]
    for i in range(1, k):
        total = closest.sum()
        if total > 0:
            pick = torch.multinomial(closest / total, 1, generator=generator)
        else:  # every point sits on a chosen center already
            pick = torch.randint(n, (1,), generator=generator, device=x.device)
        centers[i] = x[pick]
        closest = torch.minimum(closest, (x - centers[i]).pow(2).sum(dim=1))
    return centers


def lloyd_step(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """One k-means iteration: each center moves to the mean of its points (an empty one stays)."""
    codes = nearest_codes(x, centers)  # [n]
    sums = torch.zeros_like(centers).index_add_(0, codes, x)  # [k, C]
    hits = torch.bincount(codes, minlength=centers.shape[0]).unsqueeze(1)  # [k, 1]
    return torch.where(hits > 0, sums / hits.clamp(min=1), centers)


class ResidualKMeans:
    """D codebooks of K codes, seeded by k-means++ and Lloyd, then refined by mini-batch updates."""

    def __init__(self, depth: int, size: int, restart_after: int, generator: torch.Generator):
        self.depth, self.size, self.restart_after, self.generator = depth, size, restart_after, generator
        self.codebooks: List[torch.Tensor] = []  # D x [K, C] fp32
        self.counts: List[torch.Tensor] = []  # D x [K] float64: vectors assigned so far
        self.last_used: List[torch.Tensor] = []  # D x [K] int64: vectors seen at the code's last use
        self.seen = 0
        self.restarts = [0] * depth

    def seed(self, x: torch.Tensor, iters: int) -> None:
        """Fit depth after depth on x [n, C] (n >= K)."""
        if x.shape[0] < self.size:
            raise ValueError(f"{self.size} codes need at least as many seed vectors, got {x.shape[0]}: "
                             "raise seed_images or lower codebook_size")
        residual = x.float().clone()  # [n, C]
        for _ in range(self.depth):
            book = kmeans_plus_plus(residual, self.size, self.generator)  # [K, C]
            for _ in range(iters):
                book = lloyd_step(residual, book)
            residual -= book[nearest_codes(residual, book)]
            self.codebooks.append(book)
            self.counts.append(torch.zeros(self.size, dtype=torch.float64, device=x.device))
            self.last_used.append(torch.zeros(self.size, dtype=torch.long, device=x.device))

    def update(self, x: torch.Tensor) -> None:
        """One mini-batch x [n, C]: move the used codes, restart the long-unused ones, depth after depth."""
        residual = x.float().clone()  # [n, C]
        self.seen += x.shape[0]
        for d, book in enumerate(self.codebooks):
            codes = nearest_codes(residual, book)  # [n]
            hits = torch.bincount(codes, minlength=self.size).double()  # [K]
            sums = torch.zeros_like(book).index_add_(0, codes, residual)  # [K, C]
            self.counts[d] += hits
            step = (hits / self.counts[d].clamp(min=1)).float().unsqueeze(1)  # [K, 1]; 0 where unused
            book += step * (sums / hits.clamp(min=1).float().unsqueeze(1) - book)
            self.last_used[d][hits > 0] = self.seen
            dead = (self.seen - self.last_used[d]) > self.restart_after  # [K]
            inputs = residual.clone()
            residual -= book[codes]
            if dead.any():
                picks = torch.randint(x.shape[0], (int(dead.sum()),), generator=self.generator, device=x.device)
                book[dead] = inputs[picks]
                self.counts[d][dead] = 0
                self.last_used[d][dead] = self.seen
                self.restarts[d] += int(dead.sum())


def read_hf_siglip(directory: Path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(SiglipVisionConfig fields, vision weights without prefix) of an HF SigLIP directory."""
    from safetensors.torch import load_file

    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise TokenizerFileError(f"{config_path}: cannot read the encoder config: {err}") from err
    vision = config.get("vision_config", config)  # SiglipConfig nests it; SiglipVisionConfig is it
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise TokenizerFileError(f"{directory}: no *.safetensors weights")
    state = {}
    for file in files:
        state.update(load_file(file))
    prefix = find_prefix(state)
    return vision, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def list_images(root: Path, max_images: Optional[int], seed: int) -> List[Path]:
    """Image files under ``root``, sorted; a seeded random subset when ``max_images`` is set."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    if max_images is not None and max_images < len(paths):
        paths = sorted(random.Random(seed).sample(paths, max_images))
    return paths


class FeatureStream:
    """Mini-batches of (semantic, appearance) features [n, C] of image files, through the encoder."""

    def __init__(self, encoder: TappedVisionEncoder, config: FitConfig, read_images: ImageBatches):
        self.encoder, self.config, self.read_images = encoder, config, read_images
        self.device = current_device()
        self.undecodable: Dict[str, str] = {}

    def batches(self, paths: Sequence[Path]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.read_images(paths, self.config.mode, self.config.batch_images, self.config.workers):
            self.undecodable.update({str(paths[i]): error for i, _, error in batch if error})
            tiles = [t for _, t, _ in batch if t is not None]
            if tiles:
                with torch.no_grad():
                    semantic, appearance = self.encoder(torch.cat(tiles).to(self.device))  # [b, p, C] each
                width = semantic.shape[-1]
                yield semantic.reshape(-1, width).float(), appearance.reshape(-1, width).float()


def _evaluate(stream: FeatureStream, paths, quantizers: Dict[str, ResidualQuantizer], bar) -> dict:
    """Per depth, over all images with the final codebooks: relative error sum ||x - x_hat||^2 / sum ||x||^2,
    unexplained variance sum ||x - x_hat||^2 / sum ||x - mean||^2, and code-usage perplexity."""
    errors = {branch: 0 for branch in BRANCHES}
    sums = {branch: 0 for branch in BRANCHES}  # sum of x [C] (float64), for the variance
    vectors = {branch: 0 for branch in BRANCHES}
    counts = {branch: [0] * q.depth for branch, q in quantizers.items()}
    for features in stream.batches(paths):
        for branch, x in zip(BRANCHES, features):
            codes = quantizers[branch].codes(x)  # [n, D]
            errors[branch] = errors[branch] + quantizers[branch].squared_errors(x, codes)
            sums[branch] = sums[branch] + x.double().sum(dim=0).cpu()
            vectors[branch] += x.shape[0]
            counts[branch] = [a + b for a, b in zip(counts[branch], code_counts(codes, quantizers[branch].sizes))]
        bar.update(1)
    quality = {}
    for branch in BRANCHES:
        variance = errors[branch][-1] - sums[branch].pow(2).sum() / vectors[branch]  # sum ||x - mean||^2
        quality[branch] = {"relative_error": relative_errors(errors[branch]),
                         "unexplained_variance": [float(e / variance) for e in errors[branch][:-1]],
                         "perplexity": [perplexity(c) for c in counts[branch]]}
    return quality


def fit_visual_tokenizer(config: FitConfig, read_images: ImageBatches) -> dict:
    """Fit, save and evaluate (see the module docstring); returns the report, also in ``fit_report.json``.

    Needs ``megatron_asvr.runtime.initialize`` first (the encoder is a megatron module).
    """
    started = time.monotonic()
    paths = list_images(config.images, config.max_images, config.seed)
    hf_vision, hf_state = read_hf_siglip(config.encoder)
    vision = vision_config_from_hf(hf_vision, config.semantic_layer, str(config.encoder / "config.json"))
    vision.validate(ParallelConfig())
    semantic_layer = vision.layers_used  # as a positive hidden_states index
    vision = dataclasses.replace(vision, feature_layer=semantic_layer)
    encoder = TappedVisionEncoder(vision, config.appearance_layer, ParallelConfig(), resolve_backend(config.backend),
                                  torch.float32)
    load_full_state([encoder.encoder], hf_vision_to_canonical(hf_state, vision)[0])
    encoder.eval()
    stream = FeatureStream(encoder, config, read_images)
    where = torch.empty(0, device=stream.device).device  # the real device (the emulation's "cuda" is the CPU)
    generator = torch.Generator(device=where).manual_seed(config.seed)
    restart_after = config.restart_after or RESTART_AFTER_SHARES * config.codebook_size
    fits = {branch: ResidualKMeans(config.depth, config.codebook_size, restart_after, generator) for branch in BRANCHES}

    order = random.Random(config.seed).sample(paths, len(paths))
    seed_features = list(stream.batches(order[: config.seed_images]))
    for i, branch in enumerate(BRANCHES):
        fits[branch].seed(torch.cat([f[i] for f in seed_features]), config.seed_iters)
    del seed_features
    batches_per_pass = -(-len(paths) // config.batch_images)
    with tqdm(total=batches_per_pass * (config.epochs + 1), unit="batch", desc="fit visual tokenizer",
              disable=not config.progress) as bar:
        for epoch in range(config.epochs):
            for features in stream.batches(random.Random(config.seed + 1 + epoch).sample(paths, len(paths))):
                for branch, x in zip(BRANCHES, features):
                    fits[branch].update(x)
                bar.update(1)
        quantizers = {branch: ResidualQuantizer(fit.codebooks) for branch, fit in fits.items()}
        quality = _evaluate(stream, paths, quantizers, bar)

    tokenizer = DualTokenConfig(vision=vision, semantic_layer=semantic_layer, appearance_layer=config.appearance_layer,
                                codebook_sizes=(config.codebook_size,) * config.depth, code_width=vision.hidden_size,
                                head_width=config.head_width)
    config_path, checkpoint_path = save_dualtoken(
        config.output_dir, tokenizer, hf_state, AppearanceProjection.identity(vision.hidden_size).state_dict(),
        {branch: q.codebook_vectors() for branch, q in quantizers.items()})
    report = {
        "images": len(paths) - len(stream.undecodable),
        "undecodable": stream.undecodable,
        "depth": config.depth,
        "codebook_size": config.codebook_size,
        "layers": {"semantic": semantic_layer, "appearance": config.appearance_layer},
        **{branch: {**quality[branch], "restarts": fits[branch].restarts} for branch in BRANCHES},
        "config": str(config_path),
        "checkpoint": str(checkpoint_path),
        "seconds": round(time.monotonic() - started, 3),
    }
    (Path(config.output_dir) / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report


def report_table(report: dict) -> str:
    """The per-depth numbers as an aligned text table."""
    columns = ("relative_error", "unexplained_variance", "perplexity", "restarts")
    lines = [f"{'branch':<11}{'depth':>6}{'rel. error':>12}{'unexpl. var.':>14}{'perplexity':>12}{'restarts':>10}"]
    for branch in BRANCHES:
        for d, (error, unexplained, ppl, restarts) in enumerate(zip(*(report[branch][c] for c in columns))):
            lines.append(f"{branch:<11}{d:>6}{error:>12.4f}{unexplained:>14.4f}{ppl:>12.1f}{restarts:>10}")
    return os.linesep.join(lines)
