"""Benchmarks run by `polytask bench`, never by the test suite."""
