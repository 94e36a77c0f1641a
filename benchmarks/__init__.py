"""The gaugefix benchmark suite (``make bench``): see ``benchmarks/run.py``."""
