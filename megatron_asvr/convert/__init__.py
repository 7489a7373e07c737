"""Conversion between HF checkpoints and this project's canonical (TP=1 / PP=1) parameter names."""
