"""Benchmarks: scripts that measure the pipeline against alternatives (not run by the test suite)."""
