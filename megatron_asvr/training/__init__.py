"""Training: model wrapping, optimizer, the step on megatron schedules, the loop, checkpoints."""
