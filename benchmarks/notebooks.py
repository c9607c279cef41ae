"""Notebook run times and the fresh-clone test time: the course's time budgets, measured on this machine.

    python benchmarks/notebooks.py                  # every notebook, then `make test` in a fresh clone
    python benchmarks/notebooks.py --notebooks-only # skip the fresh clone (a few minutes less)
    python benchmarks/notebooks.py --retime 13_trillion_scale   # time one chapter again, keep the other rows

Each notebook is executed alone, as a learner's `make lab` runs it (same kernel, progress bars off, 2 threads), on
a copy, so the stored outputs are untouched. The fresh clone is `git clone` of this repository's HEAD into a
temporary folder followed by `make test` there with pip's cache disabled, so the install is part of the time; then
`make test-fast` (the developer's loop, the venv already there), then `make test-portable` and `make ui-test` in
the same clone, as `.ci/run` runs them. Targets: every notebook <= 120 s; `make test` on a fresh clone <= 450 s
including install; `make test-fast` <= 60 s; `make ui-test` <= 300 s including `npm ci` (`make test-portable`'s
time is reported); and the import layers of src/moelab (tests/test_layers.py): no import cycle, and the MoE layer
importing core modules only.
Writes benchmarks/results/notebooks.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

from moelab.bench import target, write_result

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_BUDGET_S = 120
FRESH_CLONE_BUDGET_S = 450
TEST_FAST_BUDGET_S = 60
UI_TEST_BUDGET_S = 300
NB_ENV = {"TQDM_DISABLE": "1", "MOELAB_THREADS": "2", "PYTHONHASHSEED": "0"}  # as `make lab` runs a notebook


def time_notebook(path: Path) -> dict:
    """Execute a copy of the notebook in its folder; wall time including kernel start, and the slowest cell."""
    nb = nbformat.read(path, as_version=4)
    # shutdown "immediate": a graceful kernel shutdown here sometimes never returned (twice in a dozen runs, after
    # the notebook had finished), so the kernel is stopped outright once the last cell is done
    client = NotebookClient(nb, timeout=600, kernel_name="moelab", record_timing=True, shutdown_kernel="immediate",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    cell_seconds = []
    for cell in nb.cells:
        timing = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            t0 = datetime.datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
            t1 = datetime.datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
            cell_seconds.append((t1 - t0).total_seconds())
    return {"case": path.stem, "seconds": round(seconds, 1), "code_cells": len(cell_seconds),
            "slowest_cell_s": round(max(cell_seconds, default=0.0), 1),
            "outside_cells_s": round(seconds - sum(cell_seconds), 1)}   # kernel start and stop, waits between cells


def time_fresh_clone() -> list[dict]:
    """`git clone` HEAD and run `make test` there with pip's cache off; wall time of the whole command. Then
    `make test-fast`, `make test-portable` and, where Chromium and npm are installed, `make ui-test` in the same clone
    (`npm ci` included)."""
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    if dirty.strip():
        print("note: the working tree has uncommitted changes; the fresh clone measures HEAD without them")
    with tempfile.TemporaryDirectory(prefix="moelab-fresh-") as tmp:
        subprocess.run(["git", "clone", "--quiet", str(ROOT), tmp], check=True)
        env = {k: v for k, v in os.environ.items() if k not in NB_ENV and not k.startswith("VIRTUAL_ENV")}
        env["PIP_NO_CACHE_DIR"] = "1"
        rows = [run_make("test", tmp, env, "make test (fresh clone, pip cache off)"),
                run_make("test-fast", tmp, env, "make test-fast (same clone)"),
                run_make("test-portable", tmp, env, "make test-portable (same clone)")]
        if Path("/usr/bin/chromium").exists() and shutil.which("npm"):
            rows.append(run_make("ui-test", tmp, env, "make ui-test (same clone, npm ci included)"))
    return rows


def run_make(target: str, cwd: str, env: dict, case: str) -> dict:
    start = time.perf_counter()
    result = subprocess.run(["make", target], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"make {target} failed in the fresh clone:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    summary = [line for line in result.stdout.splitlines() if " passed" in line][-1].strip("= ")
    return {"case": case, "seconds": round(seconds, 1), "pytest": summary}


def import_layers() -> list[dict]:
    """The import graph of src/moelab as tests/test_layers.py walks it: import cycles, and the MoE layer's imports."""
    spec = importlib.util.spec_from_file_location("test_layers", ROOT / "tests" / "test_layers.py")
    layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layers)
    cycles = 0
    for name, targets in layers.GRAPH.items():
        seen, stack = set(), list(targets)
        while stack:
            t = stack.pop()
            if t == name:
                cycles += 1
                break
            if t not in seen:
                seen.add(t)
                stack.extend(layers.GRAPH[t])
    moe = sorted(layers.GRAPH["moelab.moe"])
    outside_core = [t for t in moe if layers.top(t) not in layers.LAYERS["core"]]
    return [{"case": "import graph", "modules": len(layers.GRAPH), "modules_in_a_cycle": cycles,
             "moe_imports": moe, "moe_imports_outside_core": outside_core}]


def _chapters_first(items: list[dict], key: str) -> list[dict]:
    """The chapters' rows (named ``NN_…``) in file order, then the others as they were."""
    chapters = sorted((i for i in items if i[key][:2].isdigit()), key=lambda i: i[key])
    return chapters + [i for i in items if not i[key][:2].isdigit()]


def retime(names: list[str]) -> None:
    """Re-measure the named chapters in the committed notebooks.json (rows and targets; a new chapter is added),
    the rest as they are; rows of chapters no longer in notebooks/ (renamed by tools/renumber_chapters.py) go."""
    path = Path(__file__).parent / "results" / "notebooks.json"
    result = json.loads(path.read_text())
    gone = {r["case"] for r in result["rows"] if r["case"][:2].isdigit()
            and not (ROOT / "notebooks" / f"{r['case']}.ipynb").exists()}
    result["rows"] = [r for r in result["rows"] if r["case"] not in gone]
    result["targets"] = [t for t in result["targets"] if t["name"].split(" ")[0] not in gone]
    for name in names:
        matches = [p for p in (ROOT / "notebooks").glob(f"{name}*.ipynb")]
        if len(matches) != 1:
            sys.exit(f"notebook {name!r} matches {len(matches)} chapters; allowed: one chapter's name")
        row = time_notebook(matches[0])
        new = target(f"{row['case']} executes in <= {NOTEBOOK_BUDGET_S} s", row["seconds"], "<=", NOTEBOOK_BUDGET_S)
        result["rows"] = _chapters_first([r for r in result["rows"] if r["case"] != row["case"]] + [row], "case")
        result["targets"] = _chapters_first([t for t in result["targets"] if t["name"] != new["name"]] + [new], "name")
        print(f"{row['case']}: {row['seconds']} s")
    extra = {k: v for k, v in result.items() if k not in ("benchmark", "torch", "threads", "created", "rows",
                                                          "targets")}
    write_result("notebooks", result["rows"], result["targets"], directory=path.parent, **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--notebooks-only", action="store_true", help="skip the fresh-clone `make test`")
    parser.add_argument("--retime", nargs="+", metavar="NOTEBOOK",
                        help="time only these chapters again (e.g. 13_trillion_scale) and replace their rows and "
                             "targets in the committed results, keeping the rest")
    args = parser.parse_args()
    os.environ.update(NB_ENV)
    torch.set_num_threads(int(NB_ENV["MOELAB_THREADS"]))
    if args.retime:
        retime(args.retime)
        return
    rows = [time_notebook(p) for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))]
    targets = [target(f"{r['case']} executes in <= {NOTEBOOK_BUDGET_S} s", r["seconds"], "<=", NOTEBOOK_BUDGET_S)
               for r in rows]
    if not args.notebooks_only:
        clone = time_fresh_clone()
        rows += clone
        targets.append(target(f"make test on a fresh clone, install included, <= {FRESH_CLONE_BUDGET_S} s",
                              clone[0]["seconds"], "<=", FRESH_CLONE_BUDGET_S))
        targets.append(target(f"make test-fast with the venv installed <= {TEST_FAST_BUDGET_S} s", clone[1]["seconds"],
                              "<=", TEST_FAST_BUDGET_S))
        if len(clone) > 3:
            targets.append(target(f"make ui-test on a fresh clone, npm ci included, <= {UI_TEST_BUDGET_S} s",
                                  clone[3]["seconds"], "<=", UI_TEST_BUDGET_S))
    graph = import_layers()
    rows += graph
    targets += [target("modules of src/moelab in an import cycle", graph[0]["modules_in_a_cycle"], "==", 0),
                target("moelab.moe imports outside the core layer", len(graph[0]["moe_imports_outside_core"]), "==", 0)]
    print(f"{'case':42s} {'seconds':>8s}  details")
    for row in rows:
        details = {k: v for k, v in row.items() if k not in ("case", "seconds")}
        seconds = f"{row['seconds']:8.1f}" if "seconds" in row else f"{'-':>8s}"
        print(f"{row['case']:42s} {seconds}  {details}")
    write_result("notebooks", rows, targets, directory=Path(__file__).parent / "results", cpu_count=os.cpu_count())


if __name__ == "__main__":
    main()
