"""The capstone ladder, long: plain EP + DDP, then two-hop dispatch, node-limited routing, FP8 and DiLoCo, added
one at a time, on the same 2 × 2 emulated network.

    python benchmarks/capstone.py            # about 4 minutes on 2 cores

Four ranks (two nodes of two; fast links inside a node, a slow one between) train the course's small MoE language
model with experts sharded over all four ranks, for 300 optimizer steps per setup of
moelab.experiments.capstone.SETUPS, one after the other in one launch, each from the same initial weights on the
same batches (DiLoCo with H = 25). Recorded per setup: the validation loss every 50 steps, the bytes all ranks sent
per link class (measured, and counted analytically from the routing), and the simulated wall-clock (measured
compute + the links' α-β time). Targets: the measured bytes equal the analytic count, and everything at once ends
within 5% of plain EP + DDP's validation loss (the parity target of issue #8). Writes
benchmarks/results/capstone.json (notebooks/14_capstone.ipynb reads it).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from moelab.bench import target, write_result
from moelab.dist import launch
from moelab.experiments.capstone import SETUPS, CapstoneConfig, compare_rank

RUN = CapstoneConfig(steps=300, H=25, eval_every=50, warmup_steps=30)


def main() -> None:
    results = launch(compare_rank, RUN.topology.world, args=(tuple(SETUPS), RUN), timeout=3600)[0]
    naive = results["naive"]
    rows = []
    for setup, r in results.items():
        slow, fast = r["sent_by_class"].get("slow", 0), r["sent_by_class"].get("fast", 0)
        rows.append({"setup": setup, "description": SETUPS[setup], "val_loss": round(r["val"], 5),
                     "val_vs_naive": round(r["val"] / naive["val"] - 1, 5), "slow_bytes": slow, "fast_bytes": fast,
                     "slow_vs_naive": round(slow / naive["sent_by_class"]["slow"], 5),
                     "analytic_by_class": r["analytic_by_class"], "simulated_seconds": round(r["seconds"], 2),
                     "evals": [{"step": e["step"], "val": round(e["val"], 5), "seconds": round(e["seconds"], 3),
                                "sent_by_class": e["sent_by_class"]} for e in r["evals"]]})
        print(f"{setup:13s} val {r['val']:.4f} ({r['val'] / naive['val'] - 1:+.2%})  slow {slow / 1e6:7.1f} MB  "
              f"fast {fast / 1e6:7.1f} MB  simulated {r['seconds']:6.1f} s")
    full = rows[-1]
    exact = all(r["sent_by_class"] == r["analytic_by_class"] for r in results.values())
    targets = [target("measured bytes == analytic bytes, every setup and link class", float(exact), ">=", 1.0),
               target("everything at once: final val loss / naive's - 1", full["val_vs_naive"], "<=", 0.05)]
    write_result("capstone", rows, targets, directory=Path(__file__).parent / "results", config=dataclasses.asdict(RUN))


if __name__ == "__main__":
    main()
