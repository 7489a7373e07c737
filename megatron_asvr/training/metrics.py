"""Where a training step's numbers go: one log line per interval, the same numbers as TensorBoard
(and optionally W&B) scalars, and a tqdm progress bar with ETA when the output is a terminal.

The losses are the trainer's (``model.loss.LossReport.scalars`` of the global batch, on the last
pipeline stage), the counts its ``StepCounts``; here they are only averaged over the interval,
turned into rates and written.
"""

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

from megatron_asvr.runtime.device import peak_memory_bytes
from megatron_asvr.training.trainer import StepResult


@dataclass(frozen=True)
class StepTimings:
    """Wall time of one step on the logging rank."""

    step_s: float  # waiting for the batches included
    data_s: float  # waiting for the batches


@dataclass
class Interval:
    """Accumulates steps between two log lines."""

    steps: int = 0
    skipped: int = 0
    dropped: int = 0
    unreadable: int = 0
    tokens: int = 0  # real (non-padding) positions
    computed: int = 0  # positions the model computed, padding included
    samples: int = 0
    flops: float = 0.0
    step_time: float = 0.0
    data_time: float = 0.0
    losses: Dict[str, List[float]] = field(default_factory=dict)
    grad_norms: List[float] = field(default_factory=list)


class TensorBoardSink:
    """Scalars into TensorBoard event files under ``directory``."""

    def __init__(self, directory: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(directory)

    def add_scalars(self, scalars: Dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Scalars into a Weights & Biases run (wandb is imported only here). The run id follows the
    save directory, so a resumed training run continues the same W&B run."""

    def __init__(self, project: str, mode: str, save_dir: str, config: dict):
        import wandb

        run_id = hashlib.sha1(str(Path(save_dir).resolve()).encode()).hexdigest()[:16]
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, mode=mode, dir=save_dir, id=run_id, resume="allow", config=config)

    def add_scalars(self, scalars: Dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Writes the log line, the scalars to each sink (TensorBoard, W&B) and the progress bar, on the
    logging rank only."""

    def __init__(self, enabled: bool, total_steps: int, start_step: int, num_gpus: int, peak_tflops: float,
                 sinks: Sequence = (), log_interval: int = 1, on_gpu: bool = False):
        self.enabled, self.total_steps, self.num_gpus = enabled, total_steps, num_gpus
        self.peak_tflops, self.log_interval, self.on_gpu = peak_tflops, log_interval, on_gpu
        self.interval, self.history = Interval(), []
        self.sinks = list(sinks) if enabled else []
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def record(self, result: StepResult, timings: StepTimings) -> None:
        """One step: its losses, its counts (dropped: samples that could not fit, unreadable: samples
        whose images could not be read; both masked out, counted, never silent) and its timings."""
        iv, counts, losses = self.interval, result.counts, result.losses
        iv.steps += 1
        iv.skipped += int(result.skipped)
        iv.dropped += counts.dropped
        iv.unreadable += counts.unreadable
        iv.tokens, iv.samples = iv.tokens + counts.real_tokens, iv.samples + result.samples
        iv.flops += counts.flops
        iv.computed += counts.computed_positions
        iv.step_time, iv.data_time = iv.step_time + timings.step_s, iv.data_time + timings.data_s
        for name, value in losses.items():
            iv.losses.setdefault(name, []).append(value)
        if result.grad_norm is not None and math.isfinite(result.grad_norm):
            iv.grad_norms.append(result.grad_norm)
        entry = {"step": result.step, "lr": result.lr, "skipped": result.skipped, "dropped_samples": counts.dropped,
                 "unreadable_samples": counts.unreadable, **losses}
        if result.grad_norm is not None:
            entry["grad_norm"] = result.grad_norm
        self.history.append(entry)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in losses.items() if k.startswith("loss/")})
        if iv.steps >= self.log_interval or result.step == self.total_steps:
            self._flush(result.step, result.lr)

    def _flush(self, step: int, lr: float) -> None:
        iv = self.interval
        elapsed = max(iv.step_time, 1e-9)
        tflops = iv.flops / elapsed / 1e12 / self.num_gpus
        scalars = {name: sum(v) / len(v) for name, v in iv.losses.items()}
        scalars.update({
            "lr": lr,
            "grad_norm": sum(iv.grad_norms) / len(iv.grad_norms) if iv.grad_norms else float("nan"),
            "skipped_steps": iv.skipped,
            "dropped_samples": iv.dropped,
            "unreadable_samples": iv.unreadable,
            "tokens_per_s": iv.tokens / elapsed,  # real tokens
            "fill": iv.tokens / max(iv.computed, 1),  # real of computed positions
            "samples_per_s": iv.samples / elapsed,
            "tflops_per_gpu": tflops,
            "step_time_s": elapsed / iv.steps,
            "data_wait_s": iv.data_time / iv.steps,
            "peak_memory_gib": peak_memory_bytes() / 2**30,
        })
        if self.on_gpu:
            scalars["mfu"] = tflops / self.peak_tflops
        if self.enabled:
            visual = " ".join(f"{k.split('_', 1)[1]} {v:.4f}" for k, v in scalars.items()
                              if k.startswith("loss/visual_"))
            line = (
                f"step {step}/{self.total_steps} | text {scalars.get('loss/text', float('nan')):.4f} "
                f"| visual {visual or '-'} "
                f"| lr {lr:.3g} | grad norm {scalars['grad_norm']:.3f} | skipped {iv.skipped} dropped {iv.dropped} "
                f"unreadable {iv.unreadable} "
                f"| {scalars['tokens_per_s']:.0f} tok/s (fill {scalars['fill']:.0%}) "
                f"{scalars['samples_per_s']:.2f} samples/s "
                f"| {tflops:.3f} TFLOP/s/GPU" + (f" MFU {scalars['mfu']:.1%}" if self.on_gpu else "")
                + f" | step {scalars['step_time_s']:.2f}s data {scalars['data_wait_s']:.2f}s "
                f"| peak mem {scalars['peak_memory_gib']:.2f} GiB"
            )
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)
            self.log_scalars(scalars, step)
        self.interval = Interval()

    def log_scalars(self, scalars: Dict[str, float], step: int) -> None:
        """``scalars`` to every sink (nothing off the logging rank)."""
        for sink in self.sinks:
            sink.add_scalars(scalars, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed
