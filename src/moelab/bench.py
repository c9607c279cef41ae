"""What every script in benchmarks/ shares: steady timing, targets, and the results file's one shape.

Results go to ``<name>.json`` in the folder each script names (``benchmarks/results/``, beside the scripts), as
``{"benchmark", "torch", "threads", "created", "rows": [...], "targets": [...]}`` (plus any extra keys): ``rows``
hold the raw measurements, ``targets`` restate each of the benchmark's goals, computed from them, met or not.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import json
import operator
import time
from pathlib import Path
from typing import Callable

import torch

OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}


def steady_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the OS after every large tensor (glibc's
    ``mallopt``: mmap threshold 32 MB, no trimming). Otherwise each step pays page faults for fresh buffers,
    and on a virtual machine their cost varies enough to swamp the differences being measured. Returns
    whether it applied (glibc only); timings of every compared path run under the same setting."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError, TypeError):
        return False


def interleaved_medians(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each function, run round-robin (one call of each per round), so that a slower
    patch of the machine's time hits every contestant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}


def target(name: str, value: float, op: str, goal: float) -> dict:
    """One goal of a benchmark, checked against a measured value."""
    return {"name": name, "value": round(value, 3), "op": op, "target": goal, "met": bool(OPS[op](value, goal))}


def write_result(name: str, rows: list[dict], targets: list[dict], *, directory: Path, **extra) -> Path:
    """Write ``directory/<name>.json`` in the shared shape and print whether each target is met.

    The caller names the folder (a script passes ``Path(__file__).parent / "results"``): an installed moelab
    cannot know where a checkout's ``benchmarks/`` is."""
    result = {"benchmark": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "created": datetime.date.today().isoformat(), "rows": rows, "targets": targets, **extra}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for t in targets:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['name']}: {t['value']} ({t['op']} {t['target']})")
    shown = path.resolve()
    print(f"wrote {shown.relative_to(Path.cwd()) if shown.is_relative_to(Path.cwd()) else shown}")
    return path
