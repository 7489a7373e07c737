"""Training: the run (``loop.run``, what tools/train.py calls), the trainer and its one step, the
schedules, the task, the model wrapped for data parallelism, the metrics sinks.

    run(config, evaluator=None)   train per a RunConfig; ``evaluator``: an in-training score
"""

from megatron_asvr.training.loop import Evaluator, run

__all__ = ["Evaluator", "run"]
