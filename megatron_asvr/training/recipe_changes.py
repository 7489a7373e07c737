"""A resume under a changed recipe: each setting that differs from the checkpoint's, and what the run
does with it (honour it by a rule, or refuse to resume).

    saved = SavedRun.read(checkpoint)            its recipe (run_config.json) and its progress (common state)
    steps = total_steps(config, records, saved)  where the resumed run stops
    line = describe_changes(saved, config, trainer.scheduler, steps)
        "" if nothing changed; one line naming each change; ConfigError (that line) if one is refused

The rules (docs/method.md, "Resuming with a changed recipe"):

- the layout (TP / PP / DP) and how a step runs (``parallel.*``, ``train.micro_batch``, ``data.batching``,
  ``data.seq_length``, ...): honoured from the next step; weights and optimizer are resharded.
- ``train.global_batch``: honoured when the samples consumed so far are whole batches of the new size and
  the order is not grouped by length; the data goes on from the same sample, in batches of the new size.
- ``train.steps`` / ``train.epochs``: honoured, the run stops at the new step (epochs: once epochs x records
  samples are consumed, the ones before the resume counted at the batch they were taken at); refused if the
  checkpoint is already past it.
- the lr schedule (``lr``, ``min_lr``, ``warmup_ratio``, ``weight_decay`` and the schedule's length, which
  follows the step count): as megatron's OptimizerParamScheduler, per ``train.resume_lr_schedule``.
- the data order (``data.shards``, ``data.group_by_length``, ``train.seed``), the model (``model.*``), the
  optimizer state's own settings (Adam's betas and eps) and ``train.precision``: refused.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from megatron.core import dist_checkpointing
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_asvr.checkpoint.directory import DIST, RUN_CONFIG
from megatron_asvr.checkpoint.training_state import current_layout
from megatron_asvr.config import ConfigError, RunConfig, to_dict


@dataclass(frozen=True)
class SavedRun:
    """What a checkpoint says about the run that wrote it."""

    directory: Path
    recipe: Dict[str, dict]  # its RunConfig, as to_dict wrote it
    step: int
    consumed_samples: int
    scheduler: Dict[str, Any]  # megatron's OptimizerParamScheduler.state_dict()
    layout: Dict[str, int]  # tp, pp, dp

    @classmethod
    def read(cls, directory: Path) -> "SavedRun":
        common = dist_checkpointing.load_common_state_dict(str(directory / DIST))
        return cls(directory, json.loads((directory / RUN_CONFIG).read_text()), int(common["step"]),
                   int(common["consumed_samples"]), common["scheduler"], common["layout"])


def total_steps(config: RunConfig, num_samples: int, resumed: Optional[SavedRun] = None) -> int:
    """The step the run stops at: ``train.steps``, or once ``train.epochs`` x ``num_samples`` samples are
    consumed, those before ``resumed`` counted as consumed (at the global batch they were taken at)."""
    t = config.train
    if t.steps is not None:
        return t.steps
    step, consumed = (resumed.step, resumed.consumed_samples) if resumed else (0, 0)
    return max(1, step + (int(t.epochs * num_samples) - consumed) // t.global_batch)


@dataclass(frozen=True)
class _Context:
    saved: SavedRun
    config: RunConfig
    steps: int  # where the resumed run stops


Rule = Callable[[_Context], Tuple[Optional[bool], str]]  # -> (refused; None: decided with the lr schedule, what)


def _honoured(what: str) -> Rule:
    return lambda c: (False, what.format(next=c.saved.step + 1))


def _refused(why: str) -> Rule:
    return lambda c: (True, why.format(consumed=c.saved.consumed_samples))


def _global_batch(c: _Context) -> Tuple[bool, str]:
    new, consumed = c.config.train.global_batch, c.saved.consumed_samples
    if c.config.data.group_by_length:
        return True, "data.group_by_length builds the order in global batches: the position would move"
    if consumed % new:
        return True, f"the {consumed} samples consumed are not whole batches of {new}"
    return False, f"the data goes on from sample {consumed} in batches of {new}"


def _length(c: _Context) -> Tuple[bool, str]:
    if c.steps <= c.saved.step:
        return True, f"the checkpoint is at step {c.saved.step}, the run would stop at step {c.steps}"
    return False, f"the run stops at step {c.steps} (and the lr schedule's length follows)"


def _in_the_schedule(c: _Context) -> Tuple[Optional[bool], str]:
    return None, "see the lr schedule"


_BOOKKEEPING = _honoured("from step {next}")
_ORDER = "the data position ({consumed} samples consumed) indexes the checkpoint's order"
RULES: Dict[str, Rule] = {  # the first key that is the setting or a section above it
    "model": _refused("the checkpoint holds the weights and optimizer state of its model"),
    "parallel": _honoured("from step {next}; weights and optimizer resharded as the layout needs"),
    "data.shards": _refused(_ORDER),
    "data.group_by_length": _refused(_ORDER),
    "data.seq_length": _honoured("step {next}'s batches on are built at it (data.drop_too_long decides "
                                 "longer samples)"),
    "data": _honoured("from step {next}"),
    "train.seed": _refused(_ORDER + ", and the RNG state is the checkpoint's"),
    "train.global_batch": _global_batch,
    "train.micro_batch": _honoured("step {next} on: the same samples per step, split anew"),
    "train.steps": _length,
    "train.epochs": _length,
    "train.lr": _in_the_schedule,
    "train.min_lr": _in_the_schedule,
    "train.warmup_ratio": _in_the_schedule,
    "train.weight_decay": _in_the_schedule,
    "train.adam_beta1": _refused("the checkpoint's optimizer state carries its own"),
    "train.adam_beta2": _refused("the checkpoint's optimizer state carries its own"),
    "train.adam_eps": _refused("the checkpoint's optimizer state carries its own"),
    "train.precision": _refused("the weights and optimizer state are the checkpoint's, at its precision"),
    "train.load": _honoured("not read: a resume takes the checkpoint's weights"),
    "train": _BOOKKEEPING,
}

# train.resume_lr_schedule -> (refused, what happens to a changed schedule, megatron's OptimizerParamScheduler flags)
SCHEDULE_POLICIES = {
    "refuse": (True, "say which side wins: train.resume_lr_schedule=config or checkpoint",
               {"override_opt_param_scheduler": False, "use_checkpoint_opt_param_scheduler": False}),
    "checkpoint": (False, "the checkpoint's goes on (train.resume_lr_schedule=checkpoint)",
                   {"override_opt_param_scheduler": False, "use_checkpoint_opt_param_scheduler": True}),
    "config": (False, "the config's, from step {next} on (train.resume_lr_schedule=config)",
               {"override_opt_param_scheduler": True, "use_checkpoint_opt_param_scheduler": False}),
}


# the directory the checkpoint was found in (moved, not changed); the decision on the schedule itself
NOT_CHANGES = ("train.save_dir", "train.resume_lr_schedule")


def _flat(tree: dict, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _rule(key: str) -> Rule:
    parts = key.split(".")
    return next(RULES[".".join(parts[:n])] for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in RULES)


def _show(value: Any) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _layout_text(layout: Dict[str, int]) -> str:
    return " x ".join(f"{name.upper()}={layout[name]}" for name in ("tp", "pp", "dp"))


def describe_changes(saved: SavedRun, config: RunConfig, scheduler: OptimizerParamScheduler, steps: int) -> str:
    """One line naming each setting that differs from ``saved`` and what happens to it ("" if none);
    ConfigError carrying that line if any change is refused. ``scheduler``: the run's, as the config
    builds it, before the checkpoint's is loaded into it."""
    context = _Context(saved, config, steps)
    before, after = _flat(saved.recipe), _flat(json.loads(json.dumps(to_dict(config))))  # tuples as JSON lists
    items, refused = [], False
    for key in sorted(before.keys() | after.keys()):
        if key.startswith("parallel.") and key.split(".")[1] in ("tensor_parallel", "pipeline_parallel"):
            continue  # the layout's item names them
        if before.get(key) != after.get(key) and key not in NOT_CHANGES:
            no, what = _rule(key)(context)
            refused |= bool(no)
            label = "" if no is None else "REFUSED, " if no else "honoured, "
            items.append(f"{key} {_show(before.get(key))} -> {_show(after.get(key))}: {label}{what}")
    if saved.layout != current_layout():
        items.append(f"layout {_layout_text(saved.layout)} -> {_layout_text(current_layout())}: honoured, weights "
                     f"and optimizer resharded, the RNG reseeded")
    ours = scheduler.state_dict()
    schedule = [f"{k} {_show(saved.scheduler.get(k))} -> {_show(v)}" for k, v in ours.items()
                if k != "num_steps" and saved.scheduler.get(k) != v]
    if schedule:
        no, what, _ = SCHEDULE_POLICIES[config.train.resume_lr_schedule]
        refused |= no
        items.append(f"lr schedule ({', '.join(schedule)}): {'REFUSED' if no else 'honoured'}, "
                     + what.format(next=saved.step + 1))
    if not items:
        return ""
    line = f"resume from {saved.directory.name} with a changed recipe: " + "; ".join(items)
    if refused:
        raise ConfigError(f"{line}. Restore the refused settings, or start a new run (another train.save_dir) "
                          f"from its weights with train.load={saved.directory}")
    return line
