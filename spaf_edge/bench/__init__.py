"""``spaf-edge bench``: SpAF against its baselines on the same prompts, in one process."""

from spaf_edge.bench.benchmark import BenchOptions, run_benchmark

__all__ = ["BenchOptions", "run_benchmark"]
