"""The frozen visual tokenizer that makes ASVR's targets: DualToken's semantic and appearance branches.

One SigLIP forward pass (our megatron encoder, built up to the semantic block)
gives both branches:

- semantic: the output of block ``semantic_layer`` (26 of 27), 27 x 27 x 1152
  row-major, residual-quantized to codes [b, 729, D];
- appearance: the output of block ``appearance_layer`` (6), through DualToken's
  projection (a ProjectResnetBlock on the 27 x 27 grid), then its own RQ.

``precision="bf16"`` runs encoder, projection and quantizers in bf16 as the
released code does; ``"fp32"`` runs them in fp32 (a few argmins differ).
The config, checkpoint format and strict loading are in ``visual_format``; the
quantizer in ``visual_rq``.
"""

import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron_asvr.config import CodebookSpec, ConfigError, ParallelConfig
from megatron_asvr.model.canonical import load_full_state
from megatron_asvr.model.vision import VisionEncoder, vision_transformer_config
from megatron_asvr.runtime import current_device
from megatron_asvr.tokenizers.visual_format import (
    BRANCHES,
    PROJECTION_GROUPS,
    DualTokenConfig,
    TokenizerFileError,
    VisualCodesMeta,
    read_config,
    read_state_dict,
    split_checkpoint,
)
from megatron_asvr.tokenizers.visual_rq import ResidualQuantizer, check_precision

PROJECTION_EPS = 1e-6


class AppearanceProjection(torch.nn.Module):
    """DualToken's ``prequant_visual`` at equal widths: x + conv3x3(silu(gn(conv1x1(silu(gn(x))))))."""

    def __init__(self, width: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.norm1 = torch.nn.GroupNorm(PROJECTION_GROUPS, width, eps=PROJECTION_EPS, dtype=dtype)
        self.conv1 = torch.nn.Conv2d(width, width, kernel_size=1, dtype=dtype)
        self.norm2 = torch.nn.GroupNorm(PROJECTION_GROUPS, width, eps=PROJECTION_EPS, dtype=dtype)
        self.conv2 = torch.nn.Conv2d(width, width, kernel_size=3, padding=1, dtype=dtype)

    @classmethod
    def identity(cls, width: int) -> "AppearanceProjection":
        """A projection that returns its input exactly (conv2 = 0): what fitted tokenizers carry."""
        projection = cls(width)
        with torch.no_grad():
            projection.conv2.weight.zero_()
            projection.conv2.bias.zero_()
        return projection

    def forward(self, grid: torch.Tensor) -> torch.Tensor:  # [b, C, g, g]
        h = self.conv1(F.silu(self.norm1(grid)))
        h = self.conv2(F.silu(self.norm2(h)))
        return grid + h  # [b, C, g, g]


class TappedVisionEncoder(torch.nn.Module):
    """The SigLIP encoder up to ``vision.feature_layer``, with the output of ``tap_layer`` kept from the same pass."""

    def __init__(self, vision, tap_layer: int, parallel: ParallelConfig, backend: str, dtype: torch.dtype):
        super().__init__()
        if not 1 <= tap_layer <= vision.layers_used:
            raise ValueError(f"tap layer {tap_layer} is not among the {vision.layers_used} encoder layers built")
        self.encoder = VisionEncoder(vision, vision_transformer_config(vision, parallel, backend, dtype), backend)
        # On the runtime device (megatron builds the patch conv and position table on the host, in fp32).
        self.encoder.to(device=current_device(), dtype=dtype)
        self._tapped = None
        self.encoder.vit.decoder.layers[tap_layer - 1].register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self._tapped = output[0]  # [s, b, h]

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """images [b, 3, H, W] -> (last-layer features, tap-layer features), both [b, patches, h]."""
        last = self.encoder(images)  # [b, p, h]
        tapped, self._tapped = self._tapped, None
        return last, tapped.transpose(0, 1)[:, self.encoder.class_tokens :]  # [b, p, h]


class VisualTokenizer(torch.nn.Module):
    """images [b, 3, 384, 384] (SigLIP-normalised) -> semantic and/or appearance codes [b, 729, D]."""

    def __init__(
        self,
        config: DualTokenConfig,
        codebooks: Dict[str, Sequence[torch.Tensor]],
        precision: str = "fp32",
        parallel: ParallelConfig | None = None,
        backend: str = "local",
    ):
        super().__init__()
        self.config = config
        self.precision = precision
        dtype = check_precision(precision)
        parallel = parallel or ParallelConfig()
        self.features = TappedVisionEncoder(config.vision, config.appearance_layer, parallel, backend, dtype)
        device = current_device()
        self.projection = AppearanceProjection(config.code_width, dtype).to(device)
        self.quantizers = torch.nn.ModuleDict(
            {branch: ResidualQuantizer(codebooks[branch]) for branch in BRANCHES}).to(device)
        self.requires_grad_(False)
        self.eval()

    def codebook_vectors(self, branch: str = "semantic") -> List[torch.Tensor]:
        """The D frozen codebooks of ``branch``, [V_d, C] fp32 each, padding rows excluded."""
        return self.quantizers[branch].codebook_vectors()

    def metadata(self, branch: str = "semantic") -> VisualCodesMeta:
        return self.config.metadata(branch)

    @torch.no_grad()
    def codes(self, images: torch.Tensor, branches: Sequence[str] = ("semantic",)) -> Dict[str, torch.Tensor]:
        """branch -> int64 codes [b, patches, D] for each requested branch, from one encoder pass."""
        unknown = sorted(set(branches) - set(BRANCHES))
        if unknown or not branches:
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {list(branches)}")
        semantic, appearance = self.features(images)  # [b, p, C] each
        features = {"semantic": semantic}
        if "appearance" in branches:
            b, p, c = appearance.shape
            g = self.config.vision.grid
            grid = appearance.transpose(1, 2).reshape(b, c, g, g)  # [b, C, g, g], patches row-major
            features["appearance"] = self.projection(grid).reshape(b, c, p).transpose(1, 2)  # [b, p, C]
        return {branch: self.quantizers[branch].codes(features[branch], self.precision) for branch in branches}

    def semantic_codes(self, images: torch.Tensor) -> torch.Tensor:
        return self.codes(images, ("semantic",))["semantic"]

    def appearance_codes(self, images: torch.Tensor) -> torch.Tensor:
        return self.codes(images, ("appearance",))["appearance"]

    def dual_codes(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(semantic, appearance) codes of the same forward pass."""
        codes = self.codes(images, BRANCHES)
        return codes["semantic"], codes["appearance"]


def load_codebooks(
    config_path: str | os.PathLike, checkpoint_path: str | os.PathLike, branch: str = "semantic"
) -> Tuple[VisualCodesMeta, List[torch.Tensor]]:
    """One branch's metadata and D frozen codebooks [V_d, C] (no padding rows), without building the
    encoder: what the visual head's teacher forcing needs. Checks the checkpoint as strictly as loading."""
    config = read_config(config_path)
    weights = split_checkpoint(read_state_dict(checkpoint_path), config, str(checkpoint_path))
    return config.metadata(branch), weights.codebooks[branch]


CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def tokenizer_directory_files(directory: str | os.PathLike) -> Tuple[Path, Path]:
    """(config.json, the one checkpoint file) of a DualToken-format tokenizer directory."""
    directory = Path(directory)
    checkpoints = sorted(p for p in directory.iterdir() if p.suffix in CHECKPOINT_SUFFIXES) \
        if directory.is_dir() else []
    if not (directory / "config.json").is_file() or len(checkpoints) != 1:
        raise ConfigError(
            f"train.visual_tokenizer={str(directory)!r} must hold config.json and one checkpoint "
            f"({'/'.join(CHECKPOINT_SUFFIXES)}); found {[p.name for p in checkpoints]}"
        )
    return directory / "config.json", checkpoints[0]


def load_directory_codebooks(directory: str | os.PathLike, branches: Sequence[str]):
    """Per-branch codebook vectors (padding rows removed) and their ``CodebookSpec``, from a
    DualToken-format tokenizer directory."""
    config_path, checkpoint_path = tokenizer_directory_files(directory)
    books, specs = {}, {}
    for branch in branches:
        meta, books[branch] = load_codebooks(config_path, checkpoint_path, branch)
        specs[branch] = CodebookSpec(sizes=list(meta.codebook_sizes), dim=meta.code_width)
    return books, specs


def load_visual_tokenizer(
    config_path: str | os.PathLike,
    checkpoint_path: str | os.PathLike,
    precision: str = "fp32",
    parallel: ParallelConfig | None = None,
    backend: str = "local",
) -> VisualTokenizer:
    """Build and load a DualToken-format tokenizer (released or fitted); strict on every key.

    Needs ``megatron_asvr.runtime.initialize`` first (the encoder is a megatron module).
    """
    config = read_config(config_path)
    weights = split_checkpoint(read_state_dict(checkpoint_path), config, str(checkpoint_path))
    tokenizer = VisualTokenizer(config, weights.codebooks, precision, parallel, backend)
    load_full_state([tokenizer.features.encoder], weights.vision)
    try:
        tokenizer.projection.load_state_dict(weights.projection)
    except RuntimeError as err:  # shape mismatch: torch names the parameter
        raise TokenizerFileError(f"{checkpoint_path}: appearance projection: {err}") from err
    return tokenizer
