"""The functions defined in a solution notebook, for the tests of the exercise checks.

The tests judge the checks with the very answers the course publishes: every code cell of
``notebooks/solutions/<name>`` is run in one namespace (its check calls included), and that namespace returned.
"""
import functools
import json
from pathlib import Path

SOLUTIONS = Path(__file__).resolve().parents[1] / "notebooks" / "solutions"


@functools.cache
def load(name: str) -> dict:
    nb = json.loads((SOLUTIONS / name).read_text(encoding="utf-8"))
    namespace: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            if not source.lstrip().startswith("%"):
                exec(compile(source, f"{name}", "exec"), namespace)
    return namespace
