"""Experiments longer than a notebook's time budget, and the rank functions of the distributed chapters.

``moe_vs_dense`` runs as ``python -m moelab.experiments.moe_vs_dense``: it writes small results (JSON of curves and
metrics) under ``data/results/`` that a notebook loads, and checkpoints under ``runs/`` (not committed) so that an
interrupted run resumes where it stopped. ``expert_parallel``, ``collectives`` and ``slow_link`` hold the
importable rank functions that notebooks 05, 06 and 08 and their benchmarks launch (``moelab.dist.launch``).
"""
