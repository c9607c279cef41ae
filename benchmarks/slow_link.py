"""Data parallelism over a slow link: every method of notebook 10 for the same optimizer steps, side by side.

    python benchmarks/slow_link.py            # about 8 minutes on 2 cores

Four ranks (two nodes of two: the emulated fast links inside a node, slow ones between) train the course's small
MoE language model for 500 optimizer steps with every method of moelab.experiments.slow_link — DDP (fp32), DDP
with torch's fp16 and PowerSGD hooks, DDP with the INT8 all-reduce and error feedback, local SGD, DiLoCo and
DiLoCo with the INT8 pseudo-gradient all-reduce, the local methods with H = 50 inner steps — one after the other
in one launch, each from the same initial weights on the same batches; then DiLoCo again with OpenDiLoCo's outer
momentum 0.9 instead of our 0.5. Recorded per method: the validation loss
every 50 steps, the bytes every rank sent (per link class) and the analytic count, and the simulated wall-clock
(measured compute + the links' α-β time). Targets (issue #8): DiLoCo with H = 50 sends ≥ 50× fewer bytes than
DDP, with a final validation loss within 5% of DDP's; the INT8 all-reduce sends ≤ 0.26× the fp32 bytes.
Writes benchmarks/results/slow_link.json (notebooks/10_slow_link_training.ipynb reads it).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from moelab.bench import target, write_result
from moelab.dist import launch
from moelab.experiments.slow_link import METHODS, SlowLinkConfig, compare_rank

RUN = SlowLinkConfig(steps=500, H=50, eval_every=50, warmup_steps=50, powersgd_start=50)
OPENDILOCO_MOMENTUM = 0.9            # OpenDiLoCo's outer momentum, for runs of hundreds of outer steps


def main() -> None:
    results = launch(compare_rank, RUN.world_size, args=(tuple(METHODS), RUN), timeout=3600)[0]
    momentum = dataclasses.replace(RUN, outer_momentum=OPENDILOCO_MOMENTUM)
    variant = launch(compare_rank, RUN.world_size, args=(("diloco",), momentum), timeout=3600)[0]["diloco"]
    ddp = results["ddp"]
    rows = []
    for method, r in results.items():
        sent = sum(r["sent"])
        rows.append({"method": method, "description": METHODS[method], "val_loss": round(r["val"], 5),
                     "val_vs_ddp": round(r["val"] / ddp["val"] - 1, 5), "sent_bytes": sent,
                     "sent_by_class": r["sent_by_class"], "analytic_bytes": sum(r["analytic"]),
                     "bytes_vs_ddp": round(sent / sum(ddp["sent"]), 6), "messages": sum(r["messages"]),
                     "simulated_seconds": round(r["seconds"], 2), "n_params": r["n_params"],
                     "evals": [{k: round(v, 5) if isinstance(v, float) else v for k, v in e.items()}
                               for e in r["evals"]]})
        print(f"{method:12s} val {r['val']:.4f} ({r['val'] / ddp['val'] - 1:+.2%} vs DDP)  sent {sent / 1e6:8.1f} MB "
              f"({sent / sum(ddp['sent']):.4f}× DDP)  simulated {r['seconds']:6.1f} s")
    by = {row["method"]: row for row in rows}
    targets = [target("DDP bytes / DiLoCo (H = 50) bytes", 1 / by["diloco"]["bytes_vs_ddp"], ">=", 50),
               target("DiLoCo (H = 50) final val loss / DDP's - 1", by["diloco"]["val_vs_ddp"], "<=", 0.05),
               target("INT8 all-reduce bytes / fp32 all-reduce bytes", by["int8"]["bytes_vs_ddp"], "<=", 0.26)]
    print(f"diloco with outer momentum {OPENDILOCO_MOMENTUM}: val {variant['val']:.4f} "
          f"({variant['val'] / ddp['val'] - 1:+.2%} vs DDP)")
    write_result("slow_link", rows, targets, directory=Path(__file__).parent / "results",
                 config=dataclasses.asdict(RUN),
                 diloco_momentum_09={"outer_momentum": OPENDILOCO_MOMENTUM, "val_loss": round(variant["val"], 5),
                                     "val_vs_ddp": round(variant["val"] / ddp["val"] - 1, 5)})


if __name__ == "__main__":
    main()
