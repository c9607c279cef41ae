"""Building each preset of moelab.presets at full size on the meta device and counting it: time and memory.

    python benchmarks/sizing.py

Each preset runs in a fresh Python process (so that its peak resident memory is its own): import torch and
moelab, then time ``presets.meta_counts`` (build moelab's Transformer on the meta device, count total and active
parameters). Recorded: the seconds of the build and count, the peak RSS of the process (``ru_maxrss``; the
imports alone take most of it) and the RSS after the imports. Target (issue #9): Kimi K2 in ≤ 10 s and ≤ 300 MB
peak RSS. Writes benchmarks/results/sizing.json.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moelab.bench import target, write_result
from moelab.presets import PRESETS

CHILD = """
import json, resource, sys, time
from moelab import presets
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
counts = presets.meta_counts(presets.PRESETS[sys.argv[1]]())
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "rss_after_imports_mb": before / 1024, **counts}))
"""


def main() -> None:
    rows = []
    for name in PRESETS:
        out = subprocess.run([sys.executable, "-c", CHILD, name], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
        rows.append({"preset": name, "seconds": round(r["seconds"], 3), "peak_rss_mb": round(r["peak_rss_mb"], 1),
                     "rss_after_imports_mb": round(r["rss_after_imports_mb"], 1), "total": r["total"],
                     "active": r["active"]})
        print(f"{name:17s} {r['seconds']:6.2f} s  peak RSS {r['peak_rss_mb']:6.1f} MB (after imports "
              f"{r['rss_after_imports_mb']:6.1f} MB)  {r['total']:>17,d} parameters")
    k2 = next(row for row in rows if row["preset"] == "Kimi K2")
    targets = [target("Kimi K2 on the meta device, build and count (s)", k2["seconds"], "<=", 10),
               target("Kimi K2 on the meta device, peak RSS (MB)", k2["peak_rss_mb"], "<=", 300)]
    write_result("sizing", rows, targets, directory=Path(__file__).parent / "results")


if __name__ == "__main__":
    main()
