"""DualToken's files: ``config.json``, the checkpoint's key names, and the codes metadata record.

The released tokenizer is DualToken as ASVR's code builds it (``RQVAESiglipModel``,
github.com/AlenjandroWang/ASVR): ``torch.load(path)["state_dict"]`` holds

- ``siglip_model.vision_model.*``: its own SigLIP, HF ``SiglipModel`` names;
- ``quantizer_semantic.codebooks.{d}.weight`` [V_d + 1, C]: the semantic RQ over
  the output of encoder block 26 of 27 (last row: padding);
- ``prequant_visual.{norm1,conv1,norm2,conv2}.*``: the appearance projection over
  the output of block 6, and ``quantizer.codebooks.{d}.weight``: its RQ;
- weights this project never runs (``siglip_model.text_model.*``, the logit
  scale and bias, ``postquant_visual.*``, ``post_quant_conv.*``, ``decoder.*``,
  SigLIP blocks after the semantic one, its post-norm and head, and the EMA
  buffers of training-time codebooks), returned as ``skipped``.

Any other key, or a missing one, is an error that lists them all: ASVR's own
loader uses ``strict=False`` and trains silently against random codebooks.
``config.json`` has an ``rqvaesiglip`` section (``n_embed``, ``latent_shape``,
``code_shape``, ``shared_codebook``, ``embed_dim``, ``hidden_size``,
``pretrained_model``; optional ``layer_sem`` / ``layer_recon`` as in DualToken's
later configs, and ``vision_config`` with the SigLIP shape, which fitted
tokenizers write) and an ``rqtransformer`` section (``block_size``,
``embed_dim``, ``input_embed_dim_1``, ``vocab_size``).
"""

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from megatron_asvr.config import VISION_PRESETS, ConfigError, VisionConfig
from megatron_asvr.model.hf_vision import hf_vision_to_canonical, vision_from_hf

VISION_PREFIX = "siglip_model.vision_model."
SEMANTIC_QUANTIZER = "quantizer_semantic"
APPEARANCE_QUANTIZER = "quantizer"
APPEARANCE_PROJECTION = "prequant_visual"
PROJECTION_KEYS = tuple(f"{m}.{p}" for m in ("norm1", "conv1", "norm2", "conv2") for p in ("weight", "bias"))
BRANCHES = ("semantic", "appearance")
_QUANTIZER_OF = {"semantic": SEMANTIC_QUANTIZER, "appearance": APPEARANCE_QUANTIZER}
_UNUSED_PREFIXES = ("siglip_model.text_model.", "postquant_visual.", "post_quant_conv.", "decoder.")
_UNUSED_KEYS = ("siglip_model.logit_scale", "siglip_model.logit_bias")
_EMA_BUFFER = re.compile(r"(quantizer|quantizer_semantic)\.codebooks\.\d+\.(cluster_size_ema|embed_ema)")
# ASVR counts its taps from the last SigLIP block: semantic at i == L - 2 and
# appearance at i == L - 22 (0-based), i.e. hidden_states[L - 1] and [L - 21].
_SEMANTIC_FROM_END, _APPEARANCE_FROM_END = 1, 21
# SigLIP checkpoints named by rqvaesiglip.pretrained_model, for configs without vision_config.
KNOWN_ENCODERS = {"siglip-so400m-patch14-384": "siglip_so400m_384"}
PROJECTION_GROUPS = 32  # GroupNorm groups of DualToken's ProjectResnetBlock


class TokenizerFileError(ValueError):
    """A visual-tokenizer config or checkpoint that cannot be used; the message names file and field."""


@dataclass(frozen=True)
class VisualCodesMeta:
    """What the model config needs to know about one branch's codes."""

    branch: str  # "semantic" | "appearance"
    depth: int  # D
    codebook_sizes: Tuple[int, ...]  # V_d per depth
    code_width: int  # C, width of the codebook vectors
    feature_layer: int  # encoder hidden_states index the codes quantize (26 of 27 for semantic)
    image_size: int  # input pixels per side (384)
    num_patches: int  # codes per image tile (729)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "codebook_sizes": list(self.codebook_sizes)}

    @classmethod
    def from_json(cls, data: dict) -> "VisualCodesMeta":
        data = {"branch" if key == "kind" else key: value for key, value in data.items()}  # targets written as "kind"
        return cls(**{**data, "codebook_sizes": tuple(data["codebook_sizes"])})


@dataclass(frozen=True)
class DualTokenConfig:
    """The parts of ``config.json`` that fix what the tokenizer computes."""

    vision: VisionConfig  # its SigLIP, built up to feature_layer = semantic_layer
    semantic_layer: int  # hidden_states index of the semantic features (26)
    appearance_layer: int  # hidden_states index of the appearance features (6)
    codebook_sizes: Tuple[int, ...]  # V_d, the same for both branches
    code_width: int  # C = SigLIP width
    head_width: int  # rqtransformer.embed_dim (the visual head's E in the released code)

    @property
    def depth(self) -> int:
        return len(self.codebook_sizes)

    def metadata(self, branch: str) -> VisualCodesMeta:
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        return VisualCodesMeta(
            branch=branch,
            depth=self.depth,
            codebook_sizes=self.codebook_sizes,
            code_width=self.code_width,
            feature_layer=self.semantic_layer if branch == "semantic" else self.appearance_layer,
            image_size=self.vision.image_size,
            num_patches=self.vision.num_patches,
        )


@dataclass
class DualTokenWeights:
    """A checkpoint split by part; codebooks without their padding rows."""

    vision: Dict[str, torch.Tensor]  # canonical VisionEncoder state
    projection: Dict[str, torch.Tensor]  # AppearanceProjection state (PROJECTION_KEYS)
    codebooks: Dict[str, List[torch.Tensor]]  # branch -> D tensors [V_d, C]
    skipped: List[str]


def _get(section: dict, name: str, where: str):
    if name not in section:
        raise TokenizerFileError(f"{where}.{name} is missing")
    return section[name]


def _int_list(value, where: str, length: int = None) -> List[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TokenizerFileError(f"{where} must be a list of integers, got {value!r}")
    if length is not None and len(value) != length:
        raise TokenizerFileError(f"{where} must have {length} entries, got {value!r}")
    return value


def _per_depth(value, where: str, depth: int) -> Tuple[int, ...]:
    """An int (the same for every depth) or a list of D ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * depth
    return tuple(_int_list(value, where, depth))


def vision_config_from_hf(hf: dict, feature_layer: int, where: str) -> VisionConfig:
    """A SigLIP VisionConfig from HF ``SiglipVisionConfig`` fields, features at ``feature_layer``."""
    try:
        return vision_from_hf({**hf, "model_type": "siglip_vision_model"}, feature_layer, where)
    except ConfigError as err:
        raise TokenizerFileError(str(err)) from err


def _vision(rq: dict, where: str) -> VisionConfig:
    if "vision_config" in rq:
        return vision_config_from_hf(rq["vision_config"], -1, f"{where}.vision_config")
    name = Path(str(_get(rq, "pretrained_model", where))).name
    if name not in KNOWN_ENCODERS:
        raise TokenizerFileError(
            f"{where}.pretrained_model names {name!r}, not a known SigLIP ({', '.join(KNOWN_ENCODERS)}): "
            f"add {where}.vision_config with the HF SiglipVisionConfig fields"
        )
    return VISION_PRESETS[KNOWN_ENCODERS[name]]


def read_config(path: str | os.PathLike) -> DualTokenConfig:
    """Parse and check ``config.json``; every inconsistency names the file and the field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TokenizerFileError(f"{path}: cannot read the tokenizer config: {err}") from err
    rq = _get(raw, "rqvaesiglip", f"{path}: section")
    head = _get(raw, "rqtransformer", f"{path}: section")
    w_rq, w_head = f"{path}: rqvaesiglip", f"{path}: rqtransformer"
    latent = _int_list(_get(rq, "latent_shape", w_rq), f"{w_rq}.latent_shape", 3)
    code_shape = _int_list(_get(rq, "code_shape", w_rq), f"{w_rq}.code_shape", 3)
    if latent[:2] != code_shape[:2]:
        raise TokenizerFileError(f"{w_rq}: latent_shape {latent} and code_shape {code_shape} differ in the grid: "
                                 "only one code stack per patch is supported")
    depth, width = code_shape[2], latent[2]
    sizes = _per_depth(_get(rq, "n_embed", w_rq), f"{w_rq}.n_embed", depth)
    if rq.get("shared_codebook") and len(set(sizes)) != 1:
        raise TokenizerFileError(f"{w_rq}: shared_codebook needs one n_embed, got {list(sizes)}")
    for name in ("hidden_size", "embed_dim"):
        if rq.get(name, width) != width:
            raise TokenizerFileError(f"{w_rq}.{name}={rq[name]} differs from latent_shape[2]={width}")
    if width % PROJECTION_GROUPS:
        raise TokenizerFileError(f"{w_rq}: width {width} is not divisible by the projection's "
                                 f"{PROJECTION_GROUPS} groups")
    block = _int_list(_get(head, "block_size", w_head), f"{w_head}.block_size", 3)
    checks = (("block_size[2]", block[2], depth, "code_shape[2]"),
              ("input_embed_dim_1", _get(head, "input_embed_dim_1", w_head), width, "latent_shape[2]"),
              ("vocab_size", _per_depth(_get(head, "vocab_size", w_head), f"{w_head}.vocab_size", depth), sizes,
               "n_embed"))
    for name, value, expected, theirs in checks:
        if value != expected:
            raise TokenizerFileError(f"{w_head}.{name}={value} does not match rqvaesiglip.{theirs} ({expected})")
    vision = _vision(rq, w_rq)
    if (vision.grid, vision.hidden_size) != (latent[0], width):
        raise TokenizerFileError(f"{w_rq}: the SigLIP gives a {vision.grid} x {vision.grid} x {vision.hidden_size} "
                                 f"grid, latent_shape is {latent}")
    layers = vision.num_layers
    semantic = rq.get("layer_sem", layers - _SEMANTIC_FROM_END)
    appearance = rq.get("layer_recon", layers - _APPEARANCE_FROM_END)
    if not 1 <= appearance <= semantic <= layers:
        raise TokenizerFileError(f"{w_rq}: need 1 <= layer_recon ({appearance}) <= layer_sem ({semantic}) "
                                 f"<= SigLIP layers ({layers})")
    return DualTokenConfig(
        vision=dataclasses.replace(vision, feature_layer=semantic, frozen=True),
        semantic_layer=semantic,
        appearance_layer=appearance,
        codebook_sizes=sizes,
        code_width=width,
        head_width=_get(head, "embed_dim", w_head),
    )


def config_json(config: DualTokenConfig) -> dict:
    """``config.json`` contents for ``config`` in the released layout (separate codebooks)."""
    v, grid, sizes = config.vision, config.vision.grid, list(config.codebook_sizes)
    return {
        "architectures": ["RQVAESIGLIPTransformer"],
        "model_type": "rqvaesigliptransformer_model",
        "hidden_size": config.code_width,
        "rqvaesiglip": {
            "architectures": ["RQVAESiglip"],
            "model_type": "rqvaesiglip_model",
            "bottleneck_type": "rq",
            "hidden_size": config.code_width,
            "embed_dim": config.code_width,
            "n_embed": sizes,
            "latent_shape": [grid, grid, config.code_width],
            "code_shape": [grid, grid, config.depth],
            "shared_codebook": False,
            "restart_unused_codes": True,
            "decay": 0.99,
            "layer_sem": config.semantic_layer,
            "layer_recon": config.appearance_layer,
            "vision_config": {
                "hidden_size": v.hidden_size, "intermediate_size": v.ffn_hidden_size,
                "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_attention_heads,
                "image_size": v.image_size, "patch_size": v.patch_size, "layer_norm_eps": v.norm_eps,
                "hidden_act": "gelu_pytorch_tanh",
            },
        },
        "rqtransformer": {
            "architectures": ["RQTransformer"],
            "model_type": "rqtransformer_model",
            "block_size": [grid, grid, config.depth],
            "embed_dim": config.head_width,
            "input_embed_dim_1": config.code_width,
            "vocab_size": sizes,
        },
    }


def read_state_dict(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)["state_dict"]`` (memory-mapped), with a clear error."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise TokenizerFileError(f"{path}: cannot load the tokenizer checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise TokenizerFileError(f"{path}: expected a dict with a 'state_dict' entry, found {found}")
    return checkpoint["state_dict"]


def _listed(keys: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def split_checkpoint(state: Dict[str, torch.Tensor], config: DualTokenConfig, path: str) -> DualTokenWeights:
    """Check every key against ``config`` and sort the weights by part (see the module docstring)."""
    missing, unexpected, skipped = [], [], []
    expected = {f"{APPEARANCE_PROJECTION}.{k}" for k in PROJECTION_KEYS}
    for quantizer in _QUANTIZER_OF.values():
        expected.update(f"{quantizer}.codebooks.{d}.weight" for d in range(config.depth))
    vision = {}
    for key, value in state.items():
        if key.startswith(VISION_PREFIX):
            vision[key] = value
        elif key in expected:
            continue
        elif key.startswith(_UNUSED_PREFIXES) or key in _UNUSED_KEYS or _EMA_BUFFER.fullmatch(key):
            skipped.append(key)
        else:
            unexpected.append(key)
    missing.extend(sorted(expected - set(state)))
    canonical = {}
    try:
        canonical, vision_skipped = hf_vision_to_canonical(vision, config.vision, source_prefix=VISION_PREFIX)
        skipped.extend(vision_skipped)
    except KeyError as err:  # names the first missing or unexpected SigLIP weight
        missing.append(f"SigLIP: {err.args[0]}")
    if missing or unexpected:
        raise TokenizerFileError(f"{path}: checkpoint does not match the tokenizer config: missing keys "
                                 f"{_listed(missing)}; unexpected keys {_listed(sorted(unexpected))}")
    codebooks = {}
    for branch, quantizer in _QUANTIZER_OF.items():
        codebooks[branch] = []
        for d, size in enumerate(config.codebook_sizes):
            key, weight = f"{quantizer}.codebooks.{d}.weight", state[f"{quantizer}.codebooks.{d}.weight"]
            if tuple(weight.shape) != (size + 1, config.code_width):
                raise TokenizerFileError(f"{path}: {key} has shape {tuple(weight.shape)}, the config says "
                                         f"({size} + 1 padding, {config.code_width})")
            codebooks[branch].append(weight[:-1].float())  # [V_d, C]
    projection = {k: state[f"{APPEARANCE_PROJECTION}.{k}"] for k in PROJECTION_KEYS}
    return DualTokenWeights(canonical, projection, codebooks, skipped)


def save_dualtoken(
    out_dir: str | os.PathLike,
    config: DualTokenConfig,
    hf_vision: Dict[str, torch.Tensor],
    projection: Dict[str, torch.Tensor],
    codebooks: Dict[str, Sequence[torch.Tensor]],
    checkpoint_name: str = "tokenizer.ckpt",
) -> Tuple[Path, Path]:
    """Write ``config.json`` and the checkpoint in the released format; returns both paths.

    ``hf_vision`` holds HF SigLIP vision weights without prefix (``embeddings.*``,
    ``encoder.layers.*``, ...); codebooks are [V_d, C] and get a zero padding row.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {VISION_PREFIX + k: v.detach().cpu().contiguous() for k, v in hf_vision.items()}
    state.update({f"{APPEARANCE_PROJECTION}.{k}": v.detach().cpu().contiguous() for k, v in projection.items()})
    for branch, quantizer in _QUANTIZER_OF.items():
        for d, book in enumerate(codebooks[branch]):
            padding = torch.zeros(1, book.shape[1], dtype=torch.float32)
            state[f"{quantizer}.codebooks.{d}.weight"] = torch.cat([book.detach().cpu().float(), padding])
    config_path, checkpoint_path = out / "config.json", out / checkpoint_name
    torch.save({"state_dict": state}, checkpoint_path)
    config_path.write_text(json.dumps(config_json(config), indent=2) + "\n")
    return config_path, checkpoint_path
