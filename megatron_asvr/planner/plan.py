"""Memory per GPU for each pipeline stage of a training layout, and whether it fits.

Per GPU of a stage (one TP shard; DP replicas are identical):

- parameters at the training precision (2 bytes in bf16, 4 in fp32), frozen ones included;
- gradients: megatron's DDP keeps an fp32 gradient buffer for trainable parameters (4 bytes);
- optimizer: fp32 main parameters plus Adam's two moments (12 bytes per trainable
  parameter in bf16; 8 in fp32, where the parameters are the main copy), divided
  over data-parallel ranks with the distributed optimizer;
- pure bf16 (``train.master_weights=false``): bf16 gradient buffers (2 bytes) and
  Adam's moments in bf16 on the parameters (4 bytes), never distributed (the trainer
  turns the distributed optimizer off);
- activations: ``planner.activations`` per micro-batch, times the micro-batches
  the 1F1B schedule keeps in flight on that stage (pp - stage, at most the number
  of micro-batches), plus one layer re-materialised under full recompute.

A layout fits when every stage's total stays under the GPU's memory minus a
reserve for the CUDA context, NCCL buffers, allocator fragmentation and
short-lived buffers (the LM head's logits, all-gathers).
"""

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional

from megatron_asvr.config import ConfigError, RunConfig
from megatron_asvr.data.images import DEFAULT_GRID_PINPOINTS, TILE_SIZE
from megatron_asvr.planner.activations import MicroBatchShape, stage_activation_bytes
from megatron_asvr.planner.param_counts import COMPONENT_OF, layers_per_stage, stage_parameters
from megatron_asvr.model.flops import trained_parts

GIB = 2**30
GRAD_BYTES = 4  # fp32 gradient buffers (DataParallelSettings.grad_reduce_in_fp32)


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    reserve_gib: float = 8.0  # CUDA context, NCCL, fragmentation, transient buffers

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> float:
        return (self.gpu_memory_gib - self.reserve_gib) * GIB


@dataclass(frozen=True)
class StagePlan:
    """One GPU of one pipeline stage."""

    stage: int
    layers: int
    params: Dict[str, int]  # part -> parameters on this GPU
    trainable_params: int
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    in_flight: int  # micro-batches whose activations are held at once
    activation_bytes_per_micro: float
    recompute_bytes: float  # one layer re-materialised in backward (full recompute)

    @property
    def activation_bytes(self) -> float:
        return self.in_flight * self.activation_bytes_per_micro + self.recompute_bytes

    @property
    def total_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


@dataclass(frozen=True)
class MemoryPlan:
    cluster: Cluster
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    micro_batch: int
    num_microbatches: int
    seq_length: int
    visual_positions: int
    precision: str
    distributed_optimizer: bool
    sequence_parallel: bool
    recompute: str
    stages: List[StagePlan]

    @property
    def fits(self) -> bool:
        return all(s.total_bytes <= self.cluster.usable_bytes for s in self.stages)


def max_visual_positions(config: RunConfig) -> int:
    """Image positions of the largest image: one tile, or the base view plus the largest anyres grid."""
    tiles = 1
    if config.data.image_mode == "anyres":
        tiles += max(w * h for w, h in DEFAULT_GRID_PINPOINTS) // TILE_SIZE**2
    return tiles * config.model.vision.num_patches


def _validate(config: RunConfig, cluster: Cluster) -> None:
    if config.parallel.virtual_pipeline is not None:
        raise ConfigError("the memory planner models the 1F1B schedule without virtual pipeline: "
                          "unset parallel.virtual_pipeline")
    config.validate_shapes(cluster.world_size)


def plan_memory(config: RunConfig, cluster: Cluster, visual_positions: Optional[int] = None) -> MemoryPlan:
    """The per-stage memory of ``config``'s layout on ``cluster`` (one image of
    ``visual_positions`` positions per sample; default: the largest image)."""
    _validate(config, cluster)
    model, parallel, train = config.model, config.parallel, config.train
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    dp = parallel.data_parallel(cluster.world_size)
    positions = visual_positions or max_visual_positions(config)
    if positions + 2 > config.data.seq_length:
        raise ConfigError(f"data.seq_length={config.data.seq_length} cannot hold {positions} image positions "
                          f"plus a prompt")
    num_micro = train.global_batch // (dp * train.micro_batch)
    fp32 = train.precision == "fp32"  # auto and bf16 mean bf16 on the GPU
    element = 4 if fp32 else 2
    pure = not (fp32 or train.master_weights)  # pure bf16: no fp32 master weights or gradient buffers
    sharded = parallel.distributed_optimizer and not pure
    shape = MicroBatchShape(train.micro_batch, config.data.seq_length, positions, element, tp,
                            parallel.sequence_parallel, train.recompute == "full")
    trains = trained_parts(model)
    stages = []
    for stage, (params, layers) in enumerate(zip(stage_parameters(model, tp, pp), layers_per_stage(model.llm, pp))):
        trainable = sum(n for part, n in params.items() if COMPONENT_OF[part] in trains)
        kept, transient = stage_activation_bytes(model, shape, layers, stage == 0, stage == pp - 1)
        stages.append(StagePlan(
            stage=stage, layers=layers, params=params, trainable_params=trainable,
            param_bytes=sum(params.values()) * element,
            grad_bytes=trainable * (element if pure else GRAD_BYTES),
            optimizer_bytes=trainable * (2 * element if pure else 8 if fp32 else 12) / (dp if sharded else 1),
            in_flight=min(pp - stage, num_micro), activation_bytes_per_micro=kept, recompute_bytes=transient,
        ))
    return MemoryPlan(cluster, tp, pp, dp, train.micro_batch, num_micro, config.data.seq_length, positions,
                      "fp32" if fp32 else "bf16 (no master weights)" if pure else "bf16", sharded,
                      parallel.sequence_parallel, train.recompute, stages)


def format_plan(plan: MemoryPlan, title: str = "") -> str:
    """A markdown table, one row per pipeline stage, with the layout and the verdict."""
    c = plan.cluster
    lines = [
        f"{title + ': ' if title else ''}TP={plan.tensor_parallel} PP={plan.pipeline_parallel} DP={plan.data_parallel} "
        f"on {c.nodes} x {c.gpus_per_node} GPUs of {c.gpu_memory_gib:g} GiB ({c.reserve_gib:g} GiB reserved: "
        f"{c.usable_bytes / GIB:g} GiB usable)",
        f"micro-batch {plan.micro_batch} x {plan.seq_length} positions ({plan.visual_positions} visual), "
        f"{plan.num_microbatches} micro-batches per step; {plan.precision}; distributed optimizer "
        f"{'on' if plan.distributed_optimizer else 'off'}; "
        f"sequence parallel {'on' if plan.sequence_parallel else 'off'}; "
        f"recompute {plan.recompute}",
        "",
        "| stage | layers | holds | params/GPU | trainable | params GiB | grads GiB | optimizer GiB "
        "| activations GiB | total GiB | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in plan.stages:
        holds = "+".join(p for p in s.params if p != "llm_layers") or "-"
        activations = f"{s.in_flight} x {s.activation_bytes_per_micro / GIB:.2f}"
        if s.recompute_bytes:
            activations += f" + {s.recompute_bytes / GIB:.2f}"
        fits = "yes" if s.total_bytes <= c.usable_bytes else "NO"
        lines.append(
            f"| {s.stage} | {s.layers} | {holds} "
            f"| {sum(s.params.values()) / 1e6:,.0f}M | {s.trainable_params / 1e6:,.0f}M "
            f"| {s.param_bytes / GIB:.2f} | {s.grad_bytes / GIB:.2f} | {s.optimizer_bytes / GIB:.2f} "
            f"| {activations} = {s.activation_bytes / GIB:.2f} | {s.total_bytes / GIB:.2f} | {fits} |"
        )
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    worst = max(plan.stages, key=lambda s: s.total_bytes)
    lines.append(f"\n{verdict}: largest stage {worst.stage} needs {worst.total_bytes / GIB:.2f} GiB of "
                 f"{c.usable_bytes / GIB:g} GiB usable")
    return "\n".join(lines)


def sweep_layouts(config: RunConfig, cluster: Cluster, visual_positions: Optional[int] = None) -> str:
    """One line per TP x PP (powers of two, TP within a node) that the model and batch allow; an uneven
    layer split applies to the configured PP only (other PPs split evenly)."""
    lines = ["| TP | PP | DP | largest stage GiB | fits |", "|---|---|---|---|---|"]
    even = dataclasses.replace(config.model, llm=dataclasses.replace(
        config.model.llm, layers_in_first_stage=None, layers_in_last_stage=None))
    tp = 1
    while tp <= cluster.gpus_per_node:
        pp = 1
        while tp * pp <= cluster.world_size:
            layout = dataclasses.replace(config.parallel, tensor_parallel=tp, pipeline_parallel=pp,
                                         sequence_parallel=config.parallel.sequence_parallel and tp > 1)
            model = config.model if pp == config.parallel.pipeline_parallel else even
            try:
                plan = plan_memory(dataclasses.replace(config, model=model, parallel=layout), cluster, visual_positions)
            except ConfigError:
                pp *= 2
                continue
            worst = max(s.total_bytes for s in plan.stages) / GIB
            lines.append(f"| {tp} | {pp} | {plan.data_parallel} | {worst:.2f} | {'yes' if plan.fits else 'NO'} |")
            pp *= 2
        tp *= 2
    return "\n".join(lines)
