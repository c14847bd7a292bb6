"""Benchmarks users can run (``pulsyflux bench``); never part of the test suite."""
