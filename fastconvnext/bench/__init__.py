"""Benchmark harness behind `fastconvnext bench`."""
