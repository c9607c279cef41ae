"""Test-session settings shared by every test file."""

import os

import torch


def pytest_configure(config):
    """Give each pytest-xdist worker one torch thread.

    ``make test`` runs two workers on two cores; a test whose two OpenMP threads share the cores with the other
    worker waits on its own descheduled thread at every operation (a 1.3 s training test took 16 s that way).
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
