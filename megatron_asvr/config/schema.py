"""The run's configuration schema: one section per concern, each field typed and constrained.

Field-local rules (choices, ranges) are in the types and checked by pydantic on
construction; rules that span fields or sections (the layout against the model,
batch arithmetic, files) are the ``validate`` methods, run before anything heavy
is built. Every failure is a one-line ``ConfigError`` that says what to change.
"""

import dataclasses
from pathlib import Path
from typing import Annotated, Dict, List, Literal, Optional, Tuple, Union

from pydantic import Field

from megatron_asvr.config.errors import ConfigError, section

Positive = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]

TransformerImpl = Literal["auto", "transformer_engine", "local"]
ImageMode = Literal["resize", "pad", "anyres"]  # stage 1 | stage 2 | high resolution (data/images.py)
Resample = Literal["bicubic", "bilinear"]  # the image resize filter: SigLIP / CLIP | SigLIP2 (data/images.py)
Precision = Literal["auto", "bf16", "fp32"]  # auto: bf16 on GPU, fp32 on CPU
Recompute = Literal["none", "selective", "full"]  # LLM layers; the head recomputes with full
NanPolicy = Literal["skip", "stop"]  # skip: up to train.max_consecutive_skips bad steps
# A checkpoint that fails to write (a full disk, no permission, a writer process gone) is retried once; then
# stop: end the run (exit 1; `latest` keeps the previous checkpoint, which a restart resumes from) |
# continue: train on and save again at the next interval
SaveFailurePolicy = Literal["stop", "continue"]
# a resume whose lr schedule differs from the checkpoint's: refuse it, or which side wins (training/recipe_changes.py)
ResumeSchedulePolicy = Literal["refuse", "checkpoint", "config"]
# An image missing or unreadable at training time (preprocessing had read it): substitute: a zero image, its
# sample's loss masked, counted ("unreadable" in the step line) | stop: end the run naming the record
UnreadableImagePolicy = Literal["substitute", "stop"]
Supervision = Literal["semantic", "appearance", "dual"]  # dual: two heads, both losses
Component = Literal["vision", "projector", "llm", "visual_head"]
# pack: several samples per row (first-fit-decreasing), attention kept within each sample;
# pad_longest: each micro-batch padded to its longest sample; pad_full: every sample to seq_length
Batching = Literal["pack", "pad_longest", "pad_full"]


def _require_divisible(key: str, value: int, by_key: str, by: int, fix: str = "") -> None:
    if value % by:
        raise ConfigError(f"{key}={value} is not divisible by {by_key}={by}{fix}")


def _split_by_tp(section_name: str, tp: int, **sizes: int) -> None:
    """Each of ``sizes`` splits evenly over the tensor-parallel ranks."""
    for name, size in sizes.items():
        _require_divisible(f"{section_name}.{name}", size, "parallel.tensor_parallel", tp,
                           f": choose a tensor_parallel that divides {size}")


@section
class ParallelConfig:
    """How the model is split. Data parallelism is what remains of the world size."""

    tensor_parallel: Positive = 1
    pipeline_parallel: Positive = 1
    virtual_pipeline: Optional[Positive] = None  # model chunks per pipeline rank (interleaved 1F1B)
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    # Overlap data-parallel communication with compute (megatron DDP buckets): gradient
    # reduce-scatter / all-reduce during backward, parameter all-gather during forward.
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False  # needs the distributed optimizer

    def data_parallel(self, world_size: int) -> int:
        """Data-parallel size for ``world_size`` ranks (after ``validate``)."""
        return world_size // (self.tensor_parallel * self.pipeline_parallel)

    def validate(self, world_size: int) -> None:
        tp, pp, vp = self.tensor_parallel, self.pipeline_parallel, self.virtual_pipeline
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel "
                f"= {tp} x {pp} = {tp * pp}: launch a multiple of {tp * pp} ranks or change the layout"
            )
        if vp is not None and pp == 1:
            raise ConfigError(
                f"parallel.virtual_pipeline={vp} needs pipeline_parallel > 1: unset virtual_pipeline "
                f"or raise pipeline_parallel"
            )
        if self.overlap_param_gather and not (self.distributed_optimizer and self.overlap_grad_reduce):
            raise ConfigError(
                "parallel.overlap_param_gather needs distributed_optimizer and overlap_grad_reduce: turn them on"
            )
        if self.sequence_parallel and tp == 1:
            raise ConfigError(
                "parallel.sequence_parallel needs tensor_parallel > 1: set tensor_parallel or "
                "turn sequence_parallel off"
            )


@section
class LLMConfig:
    """A LLaMA-architecture decoder (RMSNorm, SwiGLU, RoPE, optional GQA and sliding window), with Qwen's
    variations: q/k/v biases (Qwen2 / Qwen2.5), a per-head RMSNorm on q and k before RoPE (Qwen3), a head
    width other than hidden / heads (Qwen3) and tied input / output embeddings (the small sizes)."""

    num_layers: Positive = 4
    hidden_size: Positive = 64
    num_attention_heads: Positive = 4
    num_query_groups: Optional[Positive] = None  # KV heads; None = multi-head attention
    head_dim: Optional[Positive] = None  # per-head width (megatron kv_channels); None = hidden / heads
    ffn_hidden_size: Positive = 176
    vocab_size: Positive = 256
    max_sequence_length: Positive = 128
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    sliding_window: Optional[Positive] = None  # Mistral: attend to the previous N positions
    untie_embeddings: bool = True  # false: the LM head is the input embedding (HF tie_word_embeddings)
    qkv_bias: bool = False  # biases on the q / k / v projections (Qwen2 / Qwen2.5; not on o_proj)
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3; megatron q/k_layernorm)
    init_method_std: float = 0.02
    hidden_dropout: Fraction = 0.0
    attention_dropout: Fraction = 0.0
    # Decoder layers on the first / last pipeline stage when the split is uneven
    # (the last stage also carries the visual head); None = even split.
    layers_in_first_stage: Optional[Count] = None
    layers_in_last_stage: Optional[Count] = None

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        """The width of one attention head (q, k and v alike)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_widths(self) -> Tuple[int, int]:
        """(q's width, k's = v's width) of one layer's attention: heads and query groups x kv_channels."""
        return self.num_attention_heads * self.kv_channels, self.kv_heads * self.kv_channels

    def validate(self, parallel: ParallelConfig) -> None:
        heads = self.num_attention_heads
        if self.head_dim is None:
            _require_divisible("llm.hidden_size", self.hidden_size, "llm.num_attention_heads", heads,
                               ": or set llm.head_dim")
        _require_divisible("llm.num_attention_heads", heads, "llm.num_query_groups", self.kv_heads)
        _split_by_tp("llm", parallel.tensor_parallel, num_attention_heads=heads, num_query_groups=self.kv_heads,
                     ffn_hidden_size=self.ffn_hidden_size)
        self._validate_layer_split(parallel.pipeline_parallel, parallel.virtual_pipeline or 1)

    def _validate_layer_split(self, pp: int, vp: int) -> None:
        first, last = self.layers_in_first_stage, self.layers_in_last_stage
        if first is None and last is None:
            if self.num_layers % (pp * vp):
                raise ConfigError(
                    f"llm.num_layers={self.num_layers} is not divisible by pipeline_parallel x "
                    f"virtual_pipeline = {pp} x {vp} = {pp * vp}: change the layout or set "
                    f"llm.layers_in_first_stage / layers_in_last_stage"
                )
            return
        if pp == 1:
            return  # one stage holds every layer; the split applies when pipelined
        if vp > 1:
            raise ConfigError("an uneven layer split (llm.layers_in_*_stage) is not supported with virtual_pipeline")
        middle_stages = pp - (first is not None) - (last is not None)
        rest = self.num_layers - (first or 0) - (last or 0)
        uneven = middle_stages and (rest % middle_stages or rest < middle_stages)
        if rest < 0 or (middle_stages == 0 and rest) or uneven:
            raise ConfigError(
                f"llm.num_layers={self.num_layers} cannot be split as first={first}, last={last} "
                f"with the remaining {rest} layers evenly over {middle_stages} other stages"
            )


LLM_PRESETS: Dict[str, LLMConfig] = {
    # Vicuna-1.5 (LLaMA-2 architecture).
    "vicuna_7b": LLMConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
        vocab_size=32000, max_sequence_length=4096, norm_eps=1e-5,
    ),
    "vicuna_13b": LLMConfig(
        num_layers=40, hidden_size=5120, num_attention_heads=40, ffn_hidden_size=13824,
        vocab_size=32000, max_sequence_length=4096, norm_eps=1e-5,
    ),
    # Mistral-7B-v0.1: GQA with 8 KV heads, 4096-token sliding window.
    "mistral_7b": LLMConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, vocab_size=32000, max_sequence_length=32768, norm_eps=1e-5,
        sliding_window=4096,
    ),
    **{
        # Qwen2.5 (HF Qwen2ForCausalLM configs): q/k/v biases, RoPE base 1e6; the small sizes tie the LM head
        # to the embedding. vocab_size = the checkpoint's rows, past the tokenizer's ~151665 tokens.
        f"qwen2_5_{size}": LLMConfig(
            num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=kv,
            ffn_hidden_size=ffn, vocab_size=vocab, max_sequence_length=32768, rotary_base=1e6, norm_eps=eps,
            untie_embeddings=not tied, qkv_bias=True,
        )
        for size, layers, hidden, heads, kv, ffn, vocab, tied, eps in (
            ("0_5b", 24, 896, 14, 2, 4864, 151936, True, 1e-6),
            ("1_5b", 28, 1536, 12, 2, 8960, 151936, True, 1e-6),
            ("3b", 36, 2048, 16, 2, 11008, 151936, True, 1e-6),
            ("7b", 28, 3584, 28, 4, 18944, 152064, False, 1e-6),
            ("14b", 48, 5120, 40, 8, 13824, 152064, False, 1e-5),
        )
    },
    **{
        # Qwen3 (HF Qwen3ForCausalLM configs): per-head q/k RMSNorm, head_dim 128 (the 4B's 32 x 128 q width
        # is not its hidden 2560), no biases; 0.6B / 1.7B / 4B tie the LM head to the embedding.
        f"qwen3_{size}": LLMConfig(
            num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=8, head_dim=128,
            ffn_hidden_size=ffn, vocab_size=151936, max_sequence_length=40960, rotary_base=1e6, norm_eps=1e-6,
            untie_embeddings=not tied, qk_norm=True,
        )
        for size, layers, hidden, heads, ffn, tied in (
            ("0_6b", 28, 1024, 16, 3072, True),
            ("1_7b", 28, 2048, 16, 6144, True),
            ("4b", 36, 2560, 32, 9728, True),
            ("8b", 36, 4096, 32, 12288, False),
            ("14b", 40, 5120, 40, 17408, False),
        )
    },
    "tiny": LLMConfig(),
}


@section
class VisionConfig:
    """A ViT vision encoder (SigLIP or CLIP); features from ``feature_layer`` with no post-norm."""

    family: Literal["siglip", "clip"] = "siglip"  # siglip: no class token, conv bias; clip: class token, pre-norm
    num_layers: Positive = 3
    hidden_size: Positive = 32
    num_attention_heads: Positive = 4
    ffn_hidden_size: Positive = 64
    patch_size: Positive = 14
    image_size: Positive = 28  # input pixels; a partial last patch is dropped (SigLIP 384 -> 27 x 27)
    activation: Literal["gelu_tanh", "quick_gelu"] = "gelu_tanh"  # SigLIP | CLIP
    norm_eps: float = 1e-6
    feature_layer: int = -2  # as HF hidden_states[feature_layer]; later layers are not built
    frozen: bool = True
    # how images are resized for this encoder, as its HF image processor does (training, targets, evaluation)
    resample: Resample = "bicubic"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def layers_used(self) -> int:
        """Encoder layers that feed the features (hidden_states has num_layers + 1 entries)."""
        return self.feature_layer + (self.num_layers + 1 if self.feature_layer < 0 else 0)

    def validate(self, parallel: ParallelConfig) -> None:
        if not 1 <= self.layers_used <= self.num_layers:
            raise ConfigError(
                f"vision.feature_layer={self.feature_layer} selects no encoder layer of {self.num_layers}"
            )
        _split_by_tp("vision", parallel.tensor_parallel, num_attention_heads=self.num_attention_heads,
                     ffn_hidden_size=self.ffn_hidden_size)


VISION_PRESETS: Dict[str, VisionConfig] = {
    # SigLIP-SO400M-patch14-384: 729 patches, features of block 26 of 27.
    "siglip_so400m_384": VisionConfig(
        family="siglip", num_layers=27, hidden_size=1152, num_attention_heads=16, ffn_hidden_size=4304,
        patch_size=14, image_size=384, activation="gelu_tanh", norm_eps=1e-6, feature_layer=-2,
    ),
    # SigLIP2-SO400M-patch14-384 (FixRes): SigLIP's architecture and HF classes, new weights, and its
    # processor resizes bilinearly (preprocessor_config.json "resample": 2; SigLIP's is 3, bicubic).
    "siglip2_so400m_384": VisionConfig(
        family="siglip", num_layers=27, hidden_size=1152, num_attention_heads=16, ffn_hidden_size=4304,
        patch_size=14, image_size=384, activation="gelu_tanh", norm_eps=1e-6, feature_layer=-2, resample="bilinear",
    ),
    # CLIP-ViT-L/14@336 (LLaVA-1.5's encoder): 576 patches after dropping the class token.
    "clip_vit_l_336": VisionConfig(
        family="clip", num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096,
        patch_size=14, image_size=336, activation="quick_gelu", norm_eps=1e-5, feature_layer=-2,
    ),
    "tiny": VisionConfig(),
}


@section
class CodebookSpec:
    """A frozen residual-quantizer tokenizer's codebooks, as its metadata record gives them."""

    sizes: List[Positive] = dataclasses.field(default_factory=lambda: [16384] * 8)  # V_d per depth
    dim: Positive = 1152  # C, the codebook vector width

    @property
    def depth(self) -> int:
        return len(self.sizes)


@section
class HeadConfig:
    """The ASVR visual head (docs/method.md#3-the-visual-head); the reference is E=2048, 3 layers, 16 heads."""

    hidden_size: Positive = 2048  # E
    num_layers: Positive = 3
    num_attention_heads: Positive = 16  # of hidden_size / heads = 128
    mlp_ratio: Positive = 2  # each depth's MLP is E -> mlp_ratio * E -> E
    norm_eps: float = 1e-6


@section
class ASVRConfig:
    """The visual loss and its switches (docs/method.md#4-losses, docs/method.md#5-switches)."""

    visual_loss: bool = True  # on/off for this training stage
    loss_weight: float = 1.0  # lambda in L = L_text + lambda * L_visual
    target_shift: Literal[0, 1] = 0  # 0: position j predicts patch j (released code); 1: patch j + 1
    supervise_text_only: bool = False  # released code: text-only samples get a zero image
    supervision: Supervision = "semantic"
    discrete_input: bool = False  # LLM sees the tokenizer's codebook vectors, not encoder features
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    semantic: CodebookSpec = dataclasses.field(default_factory=CodebookSpec)
    appearance: CodebookSpec = dataclasses.field(default_factory=CodebookSpec)

    @property
    def branches(self) -> List[str]:
        """The tokenizer branches whose codes are targets (one visual head each)."""
        if not self.visual_loss:
            return []
        return ["semantic", "appearance"] if self.supervision == "dual" else [self.supervision]

    def validate(self, parallel: ParallelConfig) -> None:
        head = self.head
        _require_divisible("asvr.head.hidden_size", head.hidden_size, "asvr.head.num_attention_heads",
                           head.num_attention_heads)
        _split_by_tp("asvr.head", parallel.tensor_parallel, num_attention_heads=head.num_attention_heads)


@section
class ModelConfig:
    """The whole VLM: vision encoder, projector, LLM, and the ASVR visual head(s)."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    asvr: ASVRConfig = dataclasses.field(default_factory=ASVRConfig)
    transformer_impl: TransformerImpl = "auto"
    # What trains; stage 1 is the default.
    trainable: List[Component] = dataclasses.field(default_factory=lambda: ["projector", "visual_head"])

    def validate(self, parallel: ParallelConfig) -> None:
        self.llm.validate(parallel)
        if not self.asvr.discrete_input:
            self.vision.validate(parallel)
        self.asvr.validate(parallel)


@section
class DataConfig:
    """Where the training data lives (the outputs of tools/preprocess.py and tools/precompute_targets.py)."""

    shards: str = ""  # preprocessed shard directory
    image_root: str = ""
    targets: Optional[str] = None  # precomputed visual targets directory
    image_mode: ImageMode = "resize"  # as the targets were computed (tools/precompute_targets.py --mode)
    seq_length: Positive = 2048  # a row's positions (the most a sample may take)
    batching: Batching = "pad_longest"
    num_workers: Count = 2
    group_by_length: bool = False
    drop_too_long: bool = False  # else a sample that cannot fit without cutting an image is an error
    unreadable_image: UnreadableImagePolicy = "substitute"

    def validate(self) -> None:
        for name in ("shards", "image_root"):
            path = getattr(self, name)
            if not path or not Path(path).is_dir():
                raise ConfigError(f"data.{name}={path!r} is not a directory: run tools/preprocess.py or fix the path")
        if self.targets is not None and not (Path(self.targets) / "targets.json").is_file():
            raise ConfigError(f"data.targets={self.targets!r} has no targets.json: run tools/precompute_targets.py")


Switch = Union[Literal["auto"], bool]  # auto: on with CUDA, off on CPU (train.fast_paths)
# RMSNorm: auto = Liger's Triton kernel when importable with CUDA, else torch's F.rms_norm with CUDA, the
# reference (fp32 variance, HF LLaMA's code) on CPU
RMSNormKernel = Literal["auto", "reference", "torch", "liger"]
# SDPA's backends, in priority order where several are allowed: auto = cuDNN, then flash, then
# memory-efficient, then math with CUDA; on CPU torch's own choice (default)
AttentionBackend = Literal["auto", "default", "cudnn", "flash", "efficient", "math"]


@section
class FastPathsConfig:
    """How the step runs, never what it computes (runtime/fast_paths.py): each switch on and off passes the
    same equivalence tests; on by default with CUDA, where a local-spec step has no Transformer Engine or
    apex to do the same (docs/fast_paths.md says which defaults a GPU measurement has confirmed)."""

    fused_adam: Switch = "auto"  # torch's AdamW with fused=True inside megatron's optimizer
    foreach_clip: Switch = "auto"  # gradient norm and scaling with foreach ops: no host sync per tensor
    wgrad_accumulation: Switch = "auto"  # weight gradients accumulated straight into fp32 main_grad
    bias_fusions: Switch = "auto"  # megatron's bias-SwiGLU (LLM) and bias-dropout-add fusions
    rms_norm: RMSNormKernel = "auto"
    attention: AttentionBackend = "auto"
    batched_head_mlp: Switch = "auto"  # the head's D per-depth MLPs as batched GEMMs (model/depth_mlps.py)


@section
class TrainConfig:
    """The optimisation recipe (docs/method.md#7-the-two-stage-recipe) and the run's bookkeeping.

    A switch of how the step runs (a fused optimizer, a kernel choice) belongs here or in ``model``,
    as a field or a section of its own: tools/train.py and tools/benchmark.py build the trainer from
    the same config through ``training.loop.build_trainer``, so both read it."""

    seed: int = 1234
    global_batch: Positive = 256
    micro_batch: Positive = 16
    epochs: float = 1.0
    steps: Optional[Positive] = None  # overrides epochs
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_ratio: Fraction = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: Precision = "auto"
    # false: pure bf16, AdamW steps the bf16 parameters on bf16 gradients (no fp32 master weights or gradient
    # buffers; the non-distributed optimizer): the fair race's pair B (tools/gpu_check/hf_baseline.py)
    master_weights: bool = True
    recompute: Recompute = "none"
    visual_tokenizer: Optional[str] = None  # directory with the tokenizer's config.json and checkpoint
    load: Optional[str] = None  # initial weights only: a stage-1 or HF-imported checkpoint
    save_dir: str = "runs/default"
    save_interval: Count = 0  # steps between checkpoints; 0 = only at the end (and on SIGTERM)
    keep_last: Positive = 3
    log_interval: Positive = 1
    tensorboard: bool = True
    # Weights & Biases beside TensorBoard (pip install 'megatron_asvr[wandb]'): off unless a project is set;
    # offline writes the run under save_dir/wandb for a later `wandb sync`.
    wandb_project: Optional[str] = None
    wandb_mode: Literal["online", "offline"] = "online"
    nan_policy: NanPolicy = "skip"
    max_consecutive_skips: Count = 5
    save_failure: SaveFailurePolicy = "stop"
    # A resume whose lr schedule (lr, min_lr, warmup, weight decay, its length: the step count) differs from
    # the checkpoint's: refused (Megatron-LM's default), or which side wins, as megatron's OptimizerParamScheduler
    # takes it: checkpoint (use_checkpoint_opt_param_scheduler) or config (override_opt_param_scheduler: the
    # config's schedule from the checkpoint's step on). Every other changed setting: training/recipe_changes.py.
    resume_lr_schedule: ResumeSchedulePolicy = "refuse"
    # A wait on other ranks (start-up, collectives, pipeline sends, checkpoint barriers) that lasts this long
    # ends the rank with a line naming it (runtime/waits.py); Megatron-LM's default. Seconds in tests (0.2).
    distributed_timeout_minutes: PositiveFloat = 10.0
    slow_step_factor: Annotated[float, Field(ge=0.0)] = 5.0  # report a step past this x the median (0: never)
    num_gpus_for_mfu: Optional[Positive] = None  # GPUs whose peak the MFU is relative to (default: world size)
    gpu_peak_tflops: float = 989.0  # H100 SXM dense bf16
    fast_paths: FastPathsConfig = dataclasses.field(default_factory=FastPathsConfig)
    # In-training evaluation (megatron_asvr.evaluation.in_training): held-out letter and yes/no
    # questions scored by answer likelihood every eval_interval steps (0 = off).
    eval_interval: Count = 0
    eval_data: Optional[str] = None  # JSON lines as the demo's eval.jsonl; images under data.image_root
    eval_tokenizer: Optional[str] = None  # the text tokenizer the training shards were made with

    def validate(self) -> None:
        if self.load is not None and not Path(self.load).exists():
            raise ConfigError(f"train.load={self.load!r} does not exist")
        if self.eval_interval:
            for name in ("eval_data", "eval_tokenizer"):
                path = getattr(self, name)
                if path is None or not Path(path).exists():
                    raise ConfigError(f"train.eval_interval is set but train.{name}={path!r} does not exist")


@section
class RunConfig:
    """Everything a training run needs; one YAML recipe in configs/."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate_shapes(self, world_size: int) -> None:
        """The layout against the model, the batch arithmetic and the sequence length: what any step
        of the run needs (training, the throughput benchmark and the memory planner check it here).
        Packed, a micro-batch is rows, not samples: the global batch only splits over data-parallel ranks."""
        parallel, model, train, seq_length = self.parallel, self.model, self.train, self.data.seq_length
        parallel.validate(world_size)
        model.validate(parallel)
        dp, global_batch, micro_batch = parallel.data_parallel(world_size), train.global_batch, train.micro_batch
        if self.data.batching == "pack" and global_batch % dp:
            raise ConfigError(f"train.global_batch={global_batch} is not divisible by the data-parallel size {dp}")
        if self.data.batching != "pack" and global_batch % (dp * micro_batch):
            raise ConfigError(
                f"train.global_batch={global_batch} is not divisible by data-parallel size x micro_batch "
                f"= {dp} x {micro_batch}: change train.global_batch or train.micro_batch")
        image_positions = model.vision.num_patches
        if seq_length < image_positions + 2:
            raise ConfigError(f"data.seq_length={seq_length} cannot hold one image ({image_positions} positions) "
                              f"plus a prompt: raise data.seq_length")
        if seq_length > model.llm.max_sequence_length:
            raise ConfigError(f"data.seq_length={seq_length} exceeds llm.max_sequence_length="
                              f"{model.llm.max_sequence_length}")
        if parallel.sequence_parallel and seq_length % parallel.tensor_parallel:
            raise ConfigError(f"data.seq_length={seq_length} must be divisible by tensor_parallel="
                              f"{parallel.tensor_parallel} with sequence parallelism")

    def validate(self, world_size: int) -> None:
        """Every check that needs no model: layout, shapes, batch arithmetic, files."""
        self.validate_shapes(world_size)
        self.train.validate()
        self.data.validate()
        if self.model.asvr.branches and self.data.targets is None:
            raise ConfigError("the visual loss is on (model.asvr.visual_loss) but data.targets is not set")
        if self.model.asvr.branches and self.train.visual_tokenizer is None:
            raise ConfigError("the visual loss is on but train.visual_tokenizer (its codebooks) is not set")


BenchMode = Literal["single", "compare-asvr", "compare-packing", "ab", "compare-fast-paths"]
BenchPrecision = Literal["fp32", "bf16", "fp8"]  # fp8: the LLM's layers through TE; the rest bf16
FP8Recipe = Literal["delayed", "tensorwise", "mxfp8"]
PROMPT_TOKENS = 16  # of a synthetic benchmark sample, between its image and its answer


@section
class BenchConfig:
    """What tools/benchmark.py times (``benchmark.runner``). The model, layout, batch and optimizer are
    the recipe's own sections, built by the trainer's own code, so a switch added to ``train`` or
    ``model`` (e.g. a GPU fast path) reaches the benchmark and training alike."""

    # single: the recipe as it is; compare-asvr: a plain LLaVA step, then with the visual head and its loss;
    # compare-packing: the same samples padded to full length, to each micro-batch's longest, packed;
    # ab: the recipe at two precisions (``ab``); compare-fast-paths: baseline and ASVR with train.fast_paths
    # all off, then as the recipe sets them
    mode: BenchMode = "single"
    warmup: Count = 2
    steps: Positive = 5
    # full-length samples, or lengths drawn like LLaVA-558K (stage1) / the 665K mix (stage2) (benchmark.lengths)
    lengths: Literal["full", "stage1", "stage2"] = "full"
    precision: Optional[BenchPrecision] = None  # None: train.precision
    ab: Tuple[BenchPrecision, BenchPrecision] = ("bf16", "fp8")  # the two precisions of mode ab
    fp8_recipe: FP8Recipe = "delayed"
    fp8_bf16_edge_layers: Count = 0  # keep this many first and last LLM layers in bf16 (FP8 only)
    json: Optional[str] = None  # also write the runs and comparisons here
    profile: bool = False  # one more step under torch's profiler, its device time by kernel class


@section
class BenchRunConfig(RunConfig):
    """A recipe timed on synthetic batches (tools/benchmark.py): its data section's ``seq_length`` and
    ``batching`` shape them; its files (shards, targets, tokenizer, ``train.load``) are not read."""

    bench: BenchConfig = dataclasses.field(default_factory=BenchConfig)

    def validate(self, world_size: int) -> None:
        self.validate_shapes(world_size)
        patches, b = self.model.vision.num_patches, self.bench
        if self.data.seq_length < patches + PROMPT_TOKENS + 2:
            raise ConfigError(f"data.seq_length={self.data.seq_length} cannot hold a synthetic sample: one image "
                              f"({patches} positions), a {PROMPT_TOKENS}-token prompt and an answer")
        uses_fp8 = "fp8" in (b.ab if b.mode == "ab" else (b.precision,))
        if b.fp8_bf16_edge_layers and not uses_fp8:
            raise ConfigError("bench.fp8_bf16_edge_layers applies to FP8 runs only")
        if b.fp8_bf16_edge_layers and b.fp8_recipe == "delayed":
            raise ConfigError("megatron keeps the first/last layers in bf16 only with the tensorwise or mxfp8 "
                              "recipe, not delayed: set bench.fp8_recipe=tensorwise")
