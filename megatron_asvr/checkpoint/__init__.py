"""The one place that knows the disk: our checkpoints, as training, conversion and evaluation
read and write them.

    directory.py       the layout of a save directory and of one checkpoint; which checkpoint
                       is the newest complete one (``latest``, ``iter_*``, unfinished saves)
    manifest.py        every file of a checkpoint as written, and whether it still is
    model.py           the model: its config and weights, saved at one layout, loaded at any
    training_state.py  everything a run resumes from: weights, optimizer, scheduler, RNG, data
                       position; saves that all ranks agree on, retried once

One verb set: ``save_weights`` / ``load_weights`` (weights into built chunks), ``save_model`` /
``load_model`` (config and weights; chunks built to load them), ``save_training`` /
``load_training`` (the whole training state).
"""
