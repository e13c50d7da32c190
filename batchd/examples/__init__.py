"""Runnable examples that the documentation uses (each one is run by tests/test_docs.py)."""
