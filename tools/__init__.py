"""Command-line tools; a package so that ``python -m tools.gpu_check.run`` finds its modules."""
