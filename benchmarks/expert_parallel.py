"""Expert parallelism on 1, 2 and 4 gloo ranks: step time, bytes per token, and the share of time communicating.

    python benchmarks/expert_parallel.py

One MoE layer (d_model 256, 8 experts of width 512, top-2, fp32; moelab.experiments.expert_parallel.layer_config)
sharded over 1, 2 and 4 ranks launched with moelab.dist (one thread per rank), 2048 tokens per rank (weak
scaling: the ideal step time stays flat). Each step is a forward and a backward pass after a barrier, recorded on
a per-rank timeline (moelab.timeline); a step's time is the slowest rank's. Then, on 2 ranks, the load is skewed
towards rank 0's experts through the router's selection bias, to measure what imbalance costs.

Bytes per token are the all-to-all payload each rank sends per token it owns: every (token, expert) pair is one row
of d_model fp32 values, so dispatch and combine each move k · d_model · 4 bytes per token (the same again for the
gradients in backward); of that, the rows for the rank's own experts stay local. The issue's target: the measured
payload equals that analytic count exactly. "comm share" is the time inside the all-to-alls (moving data or waiting
for the slowest rank) over the step time, per rank and its mean over ranks. With more ranks than cores (4 ranks
on a 2-core machine) the ranks take turns on the cores, and step time grows for that reason too; the JSON
records the core count.
Writes benchmarks/results/expert_parallel.json.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path

from moelab.bench import target, write_result
from moelab.dist import launch
from moelab.experiments.expert_parallel import layer_config, layer_rank
from moelab.sizing import moe_traffic

TOKENS, STEPS, WARMUP = 2048, 20, 3
WORLDS = (1, 2, 4)
SKEWS = (0.0, 0.05, 0.1, 0.2, 0.5)
COMM = ("dispatch", "combine", "combine backward", "dispatch backward")


def measure(world: int, skew: float = 0.0) -> dict:
    config = layer_config()
    results = launch(layer_rank, world, args=(config, TOKENS, STEPS, WARMUP, skew), timeout=600)
    step_s = statistics.median(max(r["seconds"][i] for r in results) for i in range(STEPS))
    first = [{e["phase"]: e for e in r["events"][0]} for r in results]       # bytes and rows: the same each step
    payload = sum(ev[p]["sent"] + ev[p]["local"] for ev in first for p in ("dispatch", "combine")) / (world * TOKENS)
    off_rank = sum(ev[p]["sent"] for ev in first for p in ("dispatch", "combine")) / (world * TOKENS)
    per_rank = [statistics.median(sum(e["comm"] for e in r["events"][i] if e["phase"] in COMM) / r["seconds"][i]
                                  for i in range(STEPS)) for r in results]
    phases = {}
    for name in ("route", "dispatch", "expert", "combine", "combine backward", "expert backward",
                 "dispatch backward"):
        phases[name] = round(1e3 * statistics.median(
            statistics.mean(sum(e["end"] - e["start"] for e in r["events"][i] if e["phase"] == name)
                            for r in results) for i in range(STEPS)), 2)
    rows = [ev["expert"]["rows"] for ev in first]
    return {"ranks": world, "skew": skew, "tokens_per_rank": TOKENS, "step_ms": round(1e3 * step_s, 2),
            "payload_bytes_per_token": payload, "off_rank_bytes_per_token": off_rank,
            "analytic_bytes_per_token": sum(moe_traffic(config, dispatch="fp32", combine="fp32")[way]
                                            for way in ("dispatch", "combine")),
            "comm_share": round(statistics.mean(per_rank), 3), "comm_share_per_rank": [round(c, 3) for c in per_rank],
            "expert_rows": rows,
            "rows_max_over_mean": round(max(rows) / statistics.mean(rows), 3), "phase_ms": phases}


def main() -> None:
    config = layer_config()
    rows = []
    for world in WORLDS:
        rows.append(measure(world))
    for skew in SKEWS[1:]:
        rows.append(measure(2, skew))
    base = rows[0]["step_ms"]
    print(f"{'ranks':>5s} {'skew':>5s} {'ms/step':>8s} {'vs 1':>5s} {'B/token':>8s} {'off-rank':>8s} "
          f"{'comm':>5s} {'rows max/mean':>13s}")
    for r in rows:
        r["relative_to_1_rank"] = round(r["step_ms"] / base, 3)
        print(f"{r['ranks']:5d} {r['skew']:5.1f} {r['step_ms']:8.1f} {r['relative_to_1_rank']:5.2f} "
              f"{r['payload_bytes_per_token']:8.0f} {r['off_rank_bytes_per_token']:8.0f} {r['comm_share']:5.0%} "
              f"{r['rows_max_over_mean']:13.2f}")
    balanced = [r for r in rows if r["skew"] == 0.0]
    targets = [target(f"payload bytes per token / analytic 2·k·d_model·4 B, {r['ranks']} ranks",
                      r["payload_bytes_per_token"] / r["analytic_bytes_per_token"], "==", 1.0) for r in balanced]
    write_result("expert_parallel", rows, targets, directory=Path(__file__).parent / "results",
                 cpu_count=os.cpu_count(), d_model=config.d_model, n_experts=config.n_routed_experts,
                 top_k=config.top_k, d_expert=config.d_expert, dtype="float32", steps=STEPS)


if __name__ == "__main__":
    main()
