"""How far the notebooks' printed numbers move on other CPUs: the measurements behind tests/nbval_portable.py.

    python benchmarks/portable.py              # every notebook under AVX2 kernels, the training ones also under default
    python benchmarks/portable.py --reuse      # compare again the notebooks the last run executed (after a re-tag)

ATen picks its vector kernels at start-up; ``ATEN_CPU_CAPABILITY=avx2`` gives what a CPU without AVX-512 runs and
``default`` the plain C++ kernels (as different again as an ARM laptop's). Each notebook is executed as
``make test`` runs it (same kernel, progress bars off, 2 threads) in a scratch copy of notebooks/ with an empty
runs/, so no checkpoint made on this machine is resumed. Every compared cell is then set against its stored
output, skipping what nbval skips (images among them): for each float that moved, how far beyond one unit of its
last printed digit (relative), by cell kind; whether an integer or a line's words moved.
Targets: every notebook passes the portable comparison; each kind's tolerance is at most twice the largest
difference measured for it. Writes benchmarks/results/portable.json.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbval.plugin import coalesce_streams, get_sanitize_patterns, transform_streams_for_comparison

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from nbval_portable import (  # noqa: E402
    NBVAL_SKIP,
    NUMBER,
    TOLERANCES,
    cell_kind,
    compare_outputs,
    flatten,
    is_float,
    last_digit,
    value,
)

from moelab.bench import target, write_result  # noqa: E402

SCRATCH = ROOT / "build" / "portable"
NB_ENV = {"TQDM_DISABLE": "1", "MOELAB_THREADS": "2", "PYTHONHASHSEED": "0"}  # as in the Makefile
NOTEBOOKS = sorted(p.relative_to(ROOT / "notebooks").as_posix() for p in ROOT.glob("notebooks/**/*.ipynb"))
TRAINING = ["01_dense_baseline.ipynb", "03_load_balancing.ipynb", "04_moe_vs_dense.ipynb",
            "05_expert_parallelism.ipynb", "06_collectives.ipynb", "08_slow_link_training.ipynb", "10_capstone.ipynb"]
PLAN = {"avx2": NOTEBOOKS, "default": TRAINING}
SKIP = NBVAL_SKIP + ("image/png", "image/jpeg")  # nbval compares images only with --nbdime


def sanitizer():
    text = (ROOT / "tests" / "nbval_sanitize.cfg").read_text(encoding="utf-8")
    patterns = get_sanitize_patterns(text)

    def sanitize(s: str) -> str:
        for regex, replace in patterns:
            s = re.sub(regex, replace, s)
        return s
    return sanitize


def scratch_tree(capability: str) -> Path:
    """A copy of notebooks/ beside links to benchmarks/ and docs/, and an empty runs/."""
    tree = SCRATCH / capability
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(ROOT / "notebooks", tree / "notebooks")
    for name in ("benchmarks", "docs"):
        (tree / name).symlink_to(ROOT / name)
    (tree / "runs").mkdir()
    return tree


def execute(path: Path, capability: str) -> float:
    """Run the notebook in place under ATen's ``capability`` kernels; errors are kept as outputs."""
    nb = nbformat.read(path, as_version=4)
    os.environ.update(NB_ENV, ATEN_CPU_CAPABILITY=capability)
    client = NotebookClient(nb, timeout=600, kernel_name="moelab", allow_errors=True, shutdown_kernel="immediate",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    nbformat.write(nb, path)
    return time.perf_counter() - start


def moved(stored: list, computed: list, sanitize) -> tuple[float, bool, bool]:
    """(largest relative move of a float beyond its last digit, whether an integer moved, whether words moved)."""
    floats, ints, words = 0.0, False, False
    a, b = flatten(stored, SKIP, sanitize), flatten(computed, SKIP, sanitize)
    for field in set(a) | set(b):
        if len(a.get(field, [])) != len(b.get(field, [])):
            words = True
            continue
        for x, y in zip(a[field], b[field]):
            xs, ys = x.split("\n"), y.split("\n")
            if len(xs) != len(ys):
                words = True
                continue
            for line_a, line_b in zip(xs, ys):
                if NUMBER.sub("#", line_a) != NUMBER.sub("#", line_b):
                    words = True
                    continue
                for s, c in zip(NUMBER.findall(line_a), NUMBER.findall(line_b)):
                    u, v = value(s), value(c)
                    if u == v:
                        continue
                    if is_float(s):
                        spare = max(0.0, abs(u - v) - max(last_digit(s), last_digit(c)))
                        floats = max(floats, spare / max(abs(u), abs(v)))
                    else:
                        ints = True
    return floats, ints, words


def compare(stored_path: Path, computed_path: Path, sanitize) -> list[dict]:
    """One row per compared code cell whose output moved."""
    stored, computed = nbformat.read(stored_path, as_version=4), nbformat.read(computed_path, as_version=4)
    rows = []
    for i, (s, c) in enumerate(zip(stored.cells, computed.cells)):
        if s.cell_type != "code" or s.source.lstrip().startswith("# NBVAL_IGNORE_OUTPUT") or s.execution_count is None:
            continue
        ref = transform_streams_for_comparison(s.outputs)
        out = transform_streams_for_comparison(coalesce_streams(c.outputs))
        if flatten(ref, SKIP, sanitize) == flatten(out, SKIP, sanitize):
            continue
        kind = cell_kind(s.metadata.get("tags", []))
        floats, ints, words = moved(ref, out, sanitize)
        problem = compare_outputs(ref, out, kind, SKIP, sanitize)
        rows.append({"cell": i, "kind": kind, "float_rel_beyond_last_digit": round(floats, 5),
                     "integer_moved": ints, "words_moved": words, "passes": problem is None,
                     **({"problem": problem} if problem else {})})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", action="store_true", help="compare the notebooks executed by the last run")
    args = parser.parse_args()
    sanitize = sanitizer()
    rows, largest = [], {kind: 0.0 for kind in TOLERANCES}
    for capability, names in PLAN.items():
        tree = SCRATCH / capability if args.reuse else scratch_tree(capability)
        for name in names:
            seconds = None if args.reuse else round(execute(tree / "notebooks" / name, capability), 1)
            cells = compare(ROOT / "notebooks" / name, tree / "notebooks" / name, sanitize)
            for cell in cells:
                largest[cell["kind"]] = max(largest[cell["kind"]], cell["float_rel_beyond_last_digit"])
            failed = [c for c in cells if not c["passes"]]
            rows.append({"case": f"{capability}: {name}", "seconds": seconds, "cells_moved": len(cells),
                         "cells_failing": len(failed), "moved": cells})
            print(f"{capability:8s} {name:45s} {len(cells):3d} cells moved, {len(failed)} failing", flush=True)
            for c in failed:
                print(f"    cell {c['cell']} ({c['kind']}): {c['problem'][:400]}")
    targets = [target("notebooks failing the portable comparison", sum(r["cells_failing"] > 0 for r in rows),
                      "<=", 0)]
    for kind, tol in TOLERANCES.items():
        if tol.rel:
            targets.append(target(f"{kind} cells: tolerance (%) within 2x the largest move measured",
                                  100 * tol.rel, "<=", round(200 * largest[kind], 4)))
    write_result("portable", rows, targets, directory=Path(__file__).parent / "results",
                 largest_moves=largest, tolerances={k: vars(t) for k, t in TOLERANCES.items()},
                 plan={k: len(v) for k, v in PLAN.items()})


if __name__ == "__main__":
    main()
