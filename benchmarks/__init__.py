"""Benchmarks for moai-sdk: ``python -m benchmarks.run`` (see benchmarks/README.md)."""
