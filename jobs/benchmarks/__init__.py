"""Benchmarks run by ``python -m jobs.bench <name>``."""
