"""Experiments longer than a notebook's time budget, and the rank functions of the distributed chapters.

``moe_vs_dense`` runs as ``python -m moelab.experiments.moe_vs_dense``: it writes small results (JSON of curves and
metrics) to ``results/`` beside it, shipped with the package for a notebook to load, and checkpoints under ``runs/``
in the current folder (not committed) so that an interrupted run resumes where it stopped. ``expert_parallel``,
``collectives``, ``overlap`` and ``slow_link`` hold the importable rank functions that notebooks 05, 06, 07 and 10
and their benchmarks launch (``moelab.dist.launch``); ``dualpipe_peer`` and ``pipelining_peer`` run the peers of
:mod:`moelab.pipeline` (DeepSeek's ``dualpipe`` and ``torch.distributed.pipelining``).
"""
