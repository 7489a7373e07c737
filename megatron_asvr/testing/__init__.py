"""Test support: multi-rank launches on CPU and parameter comparison helpers."""
