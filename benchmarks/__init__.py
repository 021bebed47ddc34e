"""Benchmarks: `python -m benchmarks` (see benchmarks/__main__.py); not part of the tests."""
