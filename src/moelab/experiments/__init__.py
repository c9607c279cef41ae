"""Experiments longer than a notebook's time budget, and the rank functions of the distributed chapters.

``moe_vs_dense`` runs as ``python -m moelab.experiments.moe_vs_dense``: it writes small results (JSON of curves and
metrics) to ``results/`` beside it, shipped with the package for a notebook to load, and checkpoints under ``runs/``
in the current folder (not committed) so that an interrupted run resumes where it stopped. ``expert_parallel``,
``collectives`` and ``slow_link`` hold the importable rank functions that notebooks 05, 06 and 09 and their
benchmarks launch (``moelab.dist.launch``).
"""
