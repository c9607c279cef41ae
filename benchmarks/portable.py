"""How far the notebooks' printed numbers move on other CPUs: the measurements behind tests/nbval_portable.py.

    python benchmarks/portable.py                        # every notebook under ATen's plain (default) kernels
    python benchmarks/portable.py --against c7f3a95      # also: the outputs that revision stored, from another CPU
    python benchmarks/portable.py --reuse                # compare again the notebooks the last run executed

The stored outputs were recorded with the kernels named in notebooks/reference_platform.json. ATen picks its vector
kernels at start-up, and ``ATEN_CPU_CAPABILITY`` overrides the choice: ``default`` gives the plain C++ kernels (as
different again as an ARM laptop's), ``avx2`` what a CPU without AVX-512 runs. Each notebook is executed as
``make test`` runs it (same kernels, progress bars off, 1 thread) in a scratch copy of notebooks/ with an empty
runs/, so no checkpoint made on this machine is resumed. ``--against REV`` adds outputs recorded on a real other
CPU: those a past revision stored, cell by cell where the cell's source is unchanged. Every compared cell is then set
against its stored output, skipping what nbval skips (images among them): for each float that moved, how far beyond
one unit of its last printed digit (relative), by cell kind; whether an integer or a line's words moved.
Targets: every notebook passes the portable comparison; each kind's tolerance is at most twice the largest
difference measured for it. Writes benchmarks/results/portable.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
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
    TOLERANCES,
    cell_kind,
    changed_lines,
    compare_outputs,
    flatten,
    is_float,
    last_digit,
    reference_platform,
    value,
)

from moelab.bench import target, write_result  # noqa: E402

SCRATCH = ROOT / "build" / "portable"
NB_ENV = {"TQDM_DISABLE": "1", "MOELAB_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}  # the Makefile's
NOTEBOOKS = sorted(p.relative_to(ROOT / "notebooks").as_posix() for p in ROOT.glob("notebooks/**/*.ipynb"))
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
            for _, _, _, numbers in changed_lines(x, y):
                if numbers is None:
                    words = True
                    continue
                for s, c in numbers:
                    u, v = value(s), value(c)
                    if u == v:
                        continue
                    if is_float(s):
                        spare = max(0.0, abs(u - v) - max(last_digit(s), last_digit(c)))
                        floats = max(floats, spare / max(abs(u), abs(v)))
                    else:
                        ints = True
    return floats, ints, words


def compare(stored: nbformat.NotebookNode, computed: nbformat.NotebookNode, sanitize) -> list[dict]:
    """One row per compared code cell whose output moved. Cells are paired by their source (a past revision may have
    cells added or changed since; a cell without its twin is not compared)."""
    twins: dict[str, list] = {}
    for c in computed.cells:
        twins.setdefault(c.source, []).append(c)
    rows = []
    for i, s in enumerate(stored.cells):
        if (s.cell_type != "code" or not twins.get(s.source) or s.source.lstrip().startswith("# NBVAL_IGNORE_OUTPUT")
                or s.execution_count is None):
            continue
        c = twins[s.source].pop(0)
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


def at_revision(rev: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def recorded_elsewhere(rev: str):
    """(platform, notebook name, the notebook as stored at ``rev``) for each notebook that exists there."""
    platform = json.loads(at_revision(rev, "notebooks/reference_platform.json"))["cpu_capability"]
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "notebooks"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    for name in NOTEBOOKS:
        if f"notebooks/{name}" in listed:
            yield f"{platform} at {rev}", name, nbformat.reads(at_revision(rev, f"notebooks/{name}"), as_version=4)


def executed_here(capabilities: list[str], reuse: bool):
    """(kernels, notebook name, the notebook run here under them) for each capability and notebook."""
    for capability in capabilities:
        tree = SCRATCH / capability if reuse else scratch_tree(capability)
        for name in NOTEBOOKS:
            path = tree / "notebooks" / name
            seconds = None if reuse else round(execute(path, capability), 1)
            yield capability, name, nbformat.read(path, as_version=4), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", default=["default"], choices=["default", "avx2", "avx512"],
                        help="ATen CPU capabilities to run every notebook under (default: default)")
    parser.add_argument("--reuse", action="store_true", help="compare the notebooks executed by the last run")
    parser.add_argument("--against", metavar="REV", help="also compare with the outputs stored at git revision REV "
                        "(recorded on the platform named in its reference_platform.json)")
    args = parser.parse_args()
    sanitize = sanitizer()
    rows, largest = [], {kind: 0.0 for kind in TOLERANCES}
    runs = [(case, name, nb, None) for case, name, nb in recorded_elsewhere(args.against)] if args.against else []
    for case, name, computed, seconds in itertools.chain(runs, executed_here(args.kernels, args.reuse)):
        cells = compare(nbformat.read(ROOT / "notebooks" / name, as_version=4), computed, sanitize)
        for cell in cells:
            largest[cell["kind"]] = max(largest[cell["kind"]], cell["float_rel_beyond_last_digit"])
        failed = [c for c in cells if not c["passes"]]
        rows.append({"case": f"{case}: {name}", "seconds": seconds, "cells_moved": len(cells),
                     "cells_failing": len(failed), "moved": cells})
        print(f"{case:16s} {name:45s} {len(cells):3d} cells moved, {len(failed)} failing", flush=True)
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
                 reference=reference_platform(), kernels=args.kernels, against=args.against)


if __name__ == "__main__":
    main()
