"""How much communication overlap hides, and how much pipeline schedules idle, on the emulated cluster.

    python benchmarks/overlap.py          # about 2 minutes

Three measurements from :mod:`moelab.experiments.overlap`, computation timed in each rank's CPU time and
communication at its α-β time on the emulated links (the capstone's: 1 ms + 100 MB/s inside a node, 5 ms +
10 MB/s between nodes):

- two transformer blocks with expert-parallel MoEs on two nodes of two ranks, forward and backward: one batch,
  two micro-batches in turn, two micro-batches overlapped, and in DeepSeek-V3's forward-and-backward pairs
  (median over 3 steps of the slowest rank, after a warm-up step);
- a data-parallel step of a small LM on two nodes: the gradients' all-reduce after backward, in buckets launched
  from backward hooks, and torch's DDP (median over 3 steps); the share of the all-reduce hidden behind backward;
- one step of GPipe, 1F1B and DualPipe on 4 ranks with 8 micro-batches: every action's CPU time measured, the
  timeline they make, each rank's idle share against the formulas, activations and parameters held per rank
  against the DeepSeek-V3 report's table 2.

Writes benchmarks/results/overlap.json.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from moelab import notebook
from moelab.bench import target, write_result
from moelab.dist import launch
from moelab.experiments import overlap as X
from moelab.schedules import bubble_fraction, dualpipe_bubble, durations, measured_bubbles, replay, schedule, stage_of

STAGES, MICROBATCHES = 4, 8


def pipeline_rows() -> tuple[list[dict], dict]:
    """Per schedule: the mean F, the mean full B (not deferring W), and for DualPipe the mean input part of a
    deferred B and the mean W, both on the stages that have an input (a first stage's input has no gradient:
    its deferred B is empty and its W the whole backward); the measured idle share against the formula, and
    against the schedule replayed with those means."""
    rows, by_name = [], {}
    for name in ("gpipe", "1f1b", "dualpipe"):
        r = X.pipeline_timelines(name, STAGES, MICROBATCHES)
        plan = schedule(name, STAGES, MICROBATCHES)
        kinds = {}
        for rank, (actions, seconds) in enumerate(zip(plan, r["seconds"])):
            for a in actions:
                first = stage_of(rank, a.chunk, STAGES) == 0
                kind = "B_input" if a.defer_w else a.kind
                if not (first and kind in ("B_input", "W")):
                    kinds.setdefault(kind, []).append(seconds[repr(a)])
        F, B = statistics.mean(kinds["F"]), statistics.mean(kinds["B"])
        B_input, W = (statistics.mean(kinds[k]) if k in kinds else 0.0 for k in ("B_input", "W"))
        busy = [sum(rank.values()) for rank in r["seconds"]]
        if name == "dualpipe":
            idle = dualpipe_bubble(STAGES, F, B, W)
            formula = statistics.mean(idle / (idle + b) for b in busy)
        else:
            formula = bubble_fraction(STAGES, MICROBATCHES)
        ideal = replay(plan, durations(F, B, W, B_input))
        row = {"kind": "pipeline", "schedule": name, "F_ms": 1e3 * F, "B_ms": 1e3 * B, "B_input_ms": 1e3 * B_input,
               "W_ms": 1e3 * W, "bubbles": r["bubbles"], "bubble": statistics.mean(r["bubbles"]),
               "formula": formula, "ideal_replay": statistics.mean(measured_bubbles(ideal)), "held": r["held"],
               "parameters": r["parameters"], "timeline": r["timeline"]}
        rows.append(row)
        by_name[name] = row
        print(f"{name:9s} F {row['F_ms']:5.1f} ms  B {row['B_ms']:5.1f} ms  B input {row['B_input_ms']:5.1f} ms  "
              f"W {row['W_ms']:5.1f} ms  idle {row['bubble']:.3f} (formula {formula:.3f}, replayed "
              f"{row['ideal_replay']:.3f})  held {r['held']}")
    return rows, by_name


def main() -> None:
    notebook.setup(seed=0, threads=1)
    ep = X.ep_summary(results := launch(X.ep_rank, 4, timeout=600))
    ep_same = all(r["same"] for r in results)
    dp = X.dp_summary(results := launch(X.dp_rank, 2, timeout=600))
    dp_same = all(r["same"] for r in results)
    rows = [{"kind": "ep", "variant": name, **values} for name, values in ep.items()]
    rows += [{"kind": "dp", "way": way, **values} for way, values in dp.items()]
    for row in rows:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    pipe_rows, pipes = pipeline_rows()
    overlapped = ep["two micro-batches overlapped"]["seconds"]
    targets = [
        target("EP, two blocks: two micro-batches overlapped / one batch (step time)",
               overlapped / ep["one batch"]["seconds"], "<=", 0.75),
        target("EP, two blocks: two micro-batches overlapped / the same two in turn (step time)",
               overlapped / ep["two micro-batches in turn"]["seconds"], "<=", 0.75),
        target("EP, two blocks: every way's outputs agree (1 = yes)", float(ep_same), ">=", 1),
        target("DP step, buckets from backward hooks: share of the all-reduce hidden behind backward",
               dp["buckets"]["hidden"], ">=", 0.5),
        target("DP step, torch DDP's buckets: share of the all-reduce hidden behind backward",
               dp["ddp"]["hidden"], ">=", 0.5),
        target("DP: the three ways' gradients agree (1 = yes)", float(dp_same), ">=", 1),
        target("1F1B (4 stages, 8 micro-batches): measured bubble / formula − 1, absolute",
               abs(pipes["1f1b"]["bubble"] / pipes["1f1b"]["formula"] - 1), "<=", 0.15),
        target("DualPipe (4 stages, 8 micro-batches): measured bubble / the report's formula − 1, absolute",
               abs(pipes["dualpipe"]["bubble"] / pipes["dualpipe"]["formula"] - 1), "<=", 0.15),
        target("DualPipe's measured bubble / 1F1B's", pipes["dualpipe"]["bubble"] / pipes["1f1b"]["bubble"], "<", 1),
    ]
    dual = pipes["dualpipe"]
    if not targets[7]["met"]:
        targets[7]["why"] = (
            f"the report's (p/2 - 1)(F&B + B - 3W) is exact when the split backward costs what the whole one does "
            f"(B input + W = B) with B = 2F and W = F (tests/test_pipeline.py replays it); torch's split here costs "
            f"more: B input {dual['B_input_ms']:.1f} ms + W {dual['W_ms']:.1f} ms against B {dual['B_ms']:.1f} ms "
            f"whole, so the deferred backwards leave less room than the formula counts. Replayed with these "
            f"measured means the schedule idles {dual['ideal_replay']:.3f}; the formula says {dual['formula']:.3f}")
    write_result("overlap", rows + pipe_rows, targets, directory=Path(__file__).parent / "results",
                 stages=STAGES, microbatches=MICROBATCHES)


if __name__ == "__main__":
    main()
