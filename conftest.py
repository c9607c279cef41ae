"""Registers the portable comparison of notebook outputs (tests/nbval_portable.py) for every pytest run here."""

pytest_plugins = ["tests.nbval_portable"]
