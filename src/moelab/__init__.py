"""MoE Lab: the canonical code behind the notebooks, from a dense transformer to trillion-parameter MoEs."""
__version__ = "0.1.0"
