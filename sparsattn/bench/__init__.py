"""Benchmarks: speed and memory against dense baselines timed in the same run (one CSV schema)."""
