"""The ts_plugin benchmark: `python -m bench.run` (or `make bench`) writes docs/benchmarks.md and docs/benchmarks.png.

Every figure is a ratio of two things measured in the same run, interleaved, so that the noise of a shared
machine falls on both sides. See bench/run.py for the plan and docs/benchmarks.md for the last results.
"""
