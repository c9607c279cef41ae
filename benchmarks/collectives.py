"""Hand-written collectives against gloo's built-ins, and the α-β model against emulated slow links, 4 ranks.

    python benchmarks/collectives.py

1. Bus bandwidth (nccl-tests' definition, moelab.network.bus_bandwidth) from 1 KB to 64 MB of fp32 on 4 gloo
   ranks over loopback, each hand-written collective of moelab.collectives side by side with gloo's built-in,
   interleaved round by round (moelab.experiments.collectives.bandwidth_rank; a round runs from a barrier to a
   barrier, so it is the slowest rank's time and includes one barrier). Targets (issue #6), at >= 16 MB: ring
   all-reduce >= 0.8x gloo's all_reduce; ring reduce-scatter faster than gloo's reduce_scatter (which gloo runs
   as an all-reduce); pairwise all-to-all >= 0.8x gloo's all_to_all_single.
2. The same algorithms over emulated links (moelab.network.Network: each round lasts at least α + bytes/β of its
   slowest message), timed from the first message any rank posts to the end of the last rank: measured time
   against moelab.network.cost. Target: within 25% in every case.
This machine has 2 cores: 4 ranks take turns on them, which slows small messages most.
Writes benchmarks/results/collectives.json.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path

from moelab.bench import target, write_result
from moelab.dist import launch
from moelab.experiments.collectives import bandwidth_rank, emulated_rank
from moelab.network import FAST, SLOW, Link, Topology, bus_bandwidth, cost

P = 4
SIZES = [2**10, 2**14, 2**18, 2**20, 2**22, 2**24, 2**26]          # 1 KB … 64 MB
ROUNDS = [20, 20, 20, 10, 6, 6, 4]
EMULATED_SIZES = [2**16, 2**20, 2**22]                              # 64 KB, 1 MB, 4 MB
REPEATS = 3
FLAT = ["ring_all_reduce", "halving_doubling_all_reduce", "ring_reduce_scatter", "tree_broadcast",
        "pairwise_all_to_all"]


def main() -> None:
    rows = launch(bandwidth_rank, P, args=(SIZES, ROUNDS), backend="gloo", timeout=1200)[0]
    for r in rows:
        r["bus_gb_s"] = round(bus_bandwidth(r["collective"], r["bytes"], r["seconds"], P) / 1e9, 4)
        r["ms"] = round(r["seconds"] * 1e3, 3)
    by = {(r["collective"], r["algorithm"], r["bytes"]): r for r in rows}
    print(f"{'collective':15s} {'algorithm':17s}" + "".join(f"{s // 1024:>9d}K" for s in SIZES) + "   (bus GB/s)")
    for collective, algorithm in dict.fromkeys((r["collective"], r["algorithm"]) for r in rows):
        print(f"{collective:15s} {algorithm:17s}" + "".join(f"{by[collective, algorithm, s]['bus_gb_s']:10.3f}"
                                                            for s in SIZES))
    big = [s for s in SIZES if s >= 16 * 2**20]

    def worst(collective, mine, theirs):
        return min(by[collective, theirs, s]["seconds"] / by[collective, mine, s]["seconds"] for s in big)

    targets = [target("ring all-reduce speed / gloo all_reduce, worst size >= 16 MB",
                      worst("all_reduce", "ring", "gloo"), ">=", 0.8),
               target("ring reduce-scatter speed / gloo reduce_scatter, worst size >= 16 MB",
                      worst("reduce_scatter", "ring", "gloo"), ">", 1.0),
               target("pairwise all-to-all speed / gloo all_to_all_single, worst size >= 16 MB",
                      worst("all_to_all", "pairwise", "gloo"), ">=", 0.8)]
    # the α-β model against emulated links: every link slow, then two nodes of two ranks. First this machine's own
    # time per round (tiny messages on an instant network): where it exceeds a link's emulated α, that link's
    # rounds take the machine's time, so the model uses the larger of the two (the α is a fitted constant, as in
    # NCCL's tuning tables).
    instant = Link("instant", 0.0, 1e15)
    calibration = launch(emulated_rank, P, args=(Topology(1, P), [("ring_all_reduce", 64 * P)] * 5, instant, instant),
                         backend="gloo", timeout=600)
    machine_alpha = statistics.median(e["comm"] for r in calibration for case in r[1:] for e in case["events"])
    print(f"this machine's time per round of tiny messages, {P} ranks: {machine_alpha * 1e3:.2f} ms")
    fast, slow = (Link(link.name, max(link.alpha, machine_alpha), link.beta) for link in (FAST, SLOW))
    cases = [(a, s) for a in FLAT for s in EMULATED_SIZES] * REPEATS
    uniform = launch(emulated_rank, P, args=(Topology(1, P), cases, SLOW, SLOW), backend="gloo", timeout=1200)
    two_tier_cases = [(a, s) for a in ("ring_all_reduce", "hierarchical_all_reduce") for s in EMULATED_SIZES] * REPEATS
    two_tier = launch(emulated_rank, P, args=(Topology(2, 2), two_tier_cases, FAST, SLOW), backend="gloo",
                      timeout=1200)
    emulated = []
    for network, results, topology, run_cases in [
            ("all links slow", uniform, Topology(1, P), cases),
            ("2 nodes x 2, fast inside, slow across", two_tier, Topology(2, 2), two_tier_cases)]:
        measured_runs: dict[tuple[str, int], list[float]] = {}
        for i, case in enumerate(run_cases):   # from the first message of any rank to the last rank's end
            measured_runs.setdefault(case, []).append(
                max(r[i]["seconds"] for r in results) - min(r[i]["events"][0]["start"] for r in results))
        for (algorithm, nbytes), runs in measured_runs.items():
            measured = statistics.median(runs)
            if algorithm == "hierarchical_all_reduce":
                predicted = cost(algorithm, nbytes, P, fast, topology, slow)
            else:                                   # every round of a flat algorithm here has a slow message
                predicted = cost(algorithm, nbytes, P, slow)
            emulated.append({"network": network, "algorithm": algorithm, "bytes": nbytes,
                             "measured_ms": round(measured * 1e3, 2), "predicted_ms": round(predicted * 1e3, 2),
                             "ratio": round(measured / predicted, 3)})
            print(f"{network:38s} {algorithm:28s} {nbytes // 1024:6d} KB  measured {measured * 1e3:8.1f} ms  "
                  f"predicted {predicted * 1e3:8.1f} ms  ({measured / predicted:.2f}x)")
    targets.append(target("alpha-beta model: worst |measured / predicted - 1| on emulated links",
                          max(abs(e["ratio"] - 1) for e in emulated), "<=", 0.25))
    write_result("collectives", rows, targets, directory=Path(__file__).parent / "results", emulated=emulated, ranks=P,
                 cpu_count=os.cpu_count(), machine_alpha_s=round(machine_alpha, 6),
                 links={link.name: {"alpha_s": link.alpha, "beta_bytes_per_s": link.beta} for link in (FAST, SLOW)})


if __name__ == "__main__":
    main()
