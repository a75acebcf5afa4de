"""Helpers shared by the tests and benchmarks (import as ``from support.X import ...``)."""
