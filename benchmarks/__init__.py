"""The benchmark suite (installed as ``engine.benchmarks``): pytest-benchmark files and the report.

Run it with ``python -m engine bench``, or directly: ``pytest benchmarks``.
"""
