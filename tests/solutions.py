"""The functions defined in a solution notebook, for the tests of the exercise checks.

The tests judge the checks with the very answers the course publishes: every code cell of
``notebooks/solutions/<name>`` is run in one namespace, and that namespace returned. The cells' check calls are left
out: the tests make them, and a rank-code check starts processes, which the tests not marked slow must not.
"""
import functools
import json
from collections.abc import Mapping
from pathlib import Path

import torch

SOLUTIONS = Path(__file__).resolve().parents[1] / "notebooks" / "solutions"


@functools.cache
def _run(name: str) -> dict:
    """Every code cell of the solution notebook in one namespace, with the caller's torch thread count kept.

    The notebook's ``notebook.setup()`` sets the course's thread count; the caller's is restored after it, so a
    pytest worker keeps the one it was given.
    """
    nb = json.loads((SOLUTIONS / name).read_text(encoding="utf-8"))
    namespace: dict = {"__name__": "__main__"}       # as in a notebook: ranks get its functions by value
    threads = torch.get_num_threads()
    try:
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                source = "".join(line for line in cell["source"] if not line.startswith("exercises.check_"))
                if not source.lstrip().startswith("%"):
                    exec(compile(source, f"{name}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    return namespace


class _Solutions(Mapping):
    """A solution notebook's namespace, run at the first lookup (so collecting the tests runs no notebook)."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, key: str):
        return _run(self.name)[key]

    def __iter__(self):
        return iter(_run(self.name))

    def __len__(self) -> int:
        return len(_run(self.name))


def load(name: str) -> Mapping:
    return _Solutions(name)
