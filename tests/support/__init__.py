"""Shared test helpers (importable as ``support``: tests/ is on sys.path through tests/conftest.py)."""
