"""Experiments longer than a notebook's time budget, run as ``python -m moelab.experiments.<name>``.

Each writes small results (JSON of curves and metrics) under ``data/results/`` that a notebook loads, and
checkpoints under ``runs/`` (not committed) so that an interrupted run resumes where it stopped.
"""
