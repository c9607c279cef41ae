"""src/moelab's imports point one way: core → exchange → training → serving → analysis → experiments, with no cycle.

Every import counts, wherever it stands: at the top, inside a function, or under ``if TYPE_CHECKING``.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "moelab"
LAYERS = {                # each top-level module or subpackage of moelab, by layer, lowest first
    "core": {"config", "layers", "ffn", "router", "dispatch", "balance", "moe", "mla", "mtp", "model", "notebook"},
    "exchange": {"sendable", "dist", "timeline", "network", "collectives", "quant", "wire", "exchange", "twohop", "ep",
                 "rounds", "overlap"},
    "training": {"corpus", "data", "checkpoint", "train", "dp", "compression", "diloco", "ddp_hooks", "qexperts",
                 "accumulation", "mixed_precision", "pipeline", "schedules", "buckets",
                 "zero", "uneven", "streaming_diloco", "elastic"},
    "serving": {"decode", "roofline", "speculative", "eplb", "expert_cache", "hf_export"},
    "analysis": {"presets", "sizing", "analysis", "viz", "bench", "exercises"},
    "experiments": {"experiments"},
}
RANK = {name: i for i, layer in enumerate(LAYERS.values()) for name in layer}


def module_name(path: Path) -> str:
    parts = ["moelab", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The moelab modules that module ``name`` imports, anywhere in its code."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = ([base] if node.module else []) + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES}
    return found - {name, "moelab"}


GRAPH = {name: imports(name) for name in MODULES}


def top(name: str) -> str:
    return name.split(".")[1] if name != "moelab" else "moelab"


def test_every_module_has_a_layer():
    placed = {top(name) for name in MODULES} - {"moelab"}
    assert placed == set(RANK), f"unplaced: {sorted(placed - set(RANK))}; gone: {sorted(set(RANK) - placed)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_or_sideways(name):
    if name == "moelab":
        return
    upward = sorted(t for t in GRAPH[name] if RANK[top(t)] > RANK[top(name)])
    assert not upward, f"{name} ({list(LAYERS)[RANK[top(name)]]}) imports a higher layer: {upward}"


def test_no_module_imports_one_that_imports_it_back():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            assert state.get(target) != "open", "import cycle: " + " → ".join(path[path.index(target):] + [target])
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])


def test_the_moe_layer_imports_only_core_modules():
    assert GRAPH["moelab.moe"] and all(top(t) in LAYERS["core"] for t in GRAPH["moelab.moe"]), GRAPH["moelab.moe"]
    assert not {"moelab.ep", "moelab.twohop", "moelab.network", "moelab.timeline", "moelab.dist"} & GRAPH["moelab.moe"]


def test_nothing_outside_experiments_imports_them():
    for name, targets in GRAPH.items():
        if top(name) != "experiments":
            assert not [t for t in targets if top(t) == "experiments"], name


def test_the_walk_sees_imports_inside_functions_and_type_checking_blocks():
    assert "moelab.model" in GRAPH["moelab.ep"]                       # under `if TYPE_CHECKING:`
    assert {"moelab.quant", "moelab.router"} <= GRAPH["moelab.experiments.collectives"]   # inside functions
