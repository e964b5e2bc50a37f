"""Benchmarks: run from the repository root as `python -m benchmarks.<name>`; each writes JSON to benchmarks/results/."""
