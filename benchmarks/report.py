"""Rewrite the measured numbers in README.md from benchmarks/results/*.json (run by `make bench` last).

    python benchmarks/report.py

README.md marks each generated block with `<!-- results:NAME -->` … `<!-- /results:NAME -->`; the notebook
run times in the course map are updated in place, and docs/teaching.md's table of run times is generated the same
way. tests/test_readme.py checks that both agree with the results files, so they cannot drift apart.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEACHING = ROOT / "docs" / "teaching.md"


def load(name: str) -> dict:
    return json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text(encoding="utf-8"))


def yes(met: bool) -> str:
    return "yes" if met else "no"


def notebooks_block(r: dict) -> str:
    notebooks = [row for row in r["rows"] if row["case"][:2].isdigit()]
    times = ", ".join(f"{row['case']}: {row['seconds']:.1f} s" for row in notebooks)
    met = all(t["met"] for t in r["targets"] if "executes" in t["name"])
    lines = ["| budget | target | measured | met |", "|---|---|---|---|",
             f"| every notebook executes | ≤ 120 s | {times} | {yes(met)} |"]
    for command, label in (("make test", "`make test` on a fresh clone, install included (pip cache off)"),
                           ("make test-fast", "then `make test-fast` in that clone (the developer's loop)"),
                           ("make test-portable", "then `make test-portable` in that clone (other CPU kernels)"),
                           ("make ui-test", "then `make ui-test` in that clone, `npm ci` included (as `.ci/run`)")):
        row = next((row for row in r["rows"] if row["case"].startswith(command + " ")), None)
        goal = next((t for t in r["targets"] if t["name"].startswith(command + " ")), None)
        if row is None:
            lines.append(f"| {label} | — | not measured by the last run | — |")
        elif goal is None:
            lines.append(f"| {label} | — | {row['seconds']:.1f} s ({row['pytest']}) | — |")
        else:
            lines.append(f"| {label} | ≤ {goal['target']} s | {row['seconds']:.1f} s ({row['pytest']}) | "
                         f"{yes(goal['met'])} |")
    graph = next((row for row in r["rows"] if row["case"] == "import graph"), None)
    if graph is not None:
        cycle = next(t for t in r["targets"] if "import cycle" in t["name"])
        core = next(t for t in r["targets"] if "moelab.moe imports" in t["name"])
        lines += [f"| modules of `src/moelab` in an import cycle ({graph['modules']} modules) | 0 | "
                  f"{graph['modules_in_a_cycle']} | {yes(cycle['met'])} |",
                  f"| `moelab.moe` imports outside the core layer | 0 | "
                  f"{len(graph['moe_imports_outside_core'])} (it imports {', '.join(graph['moe_imports'])}) | "
                  f"{yes(core['met'])} |"]
    return "\n".join(lines)


def moe_dispatch_block(r: dict) -> str:
    lines = ["| shape | dense | loop | sorted | grouped | capacity (factor 1.25) | fastest dropless / dense "
             "| target | met |", "|---|---|---|---|---|---|---|---|---|"]
    for case in ("coarse", "fine"):
        rows = {row["impl"]: row for row in r["rows"] if row["case"] == case}
        t = next(t for t in r["targets"] if t["name"].startswith(case) and "/ dense" in t["name"])
        shape = rows["grouped"]
        cells = [f"{rows['dense']['fwd_bwd_ms']:.1f} ms"] + [
            f"{rows[i]['fwd_bwd_ms']:.1f} ms ({rows[i]['ratio_to_dense']:.2f}×)"
            for i in ("loop", "sorted", "grouped", "capacity")]
        lines.append(f"| {case}: E = {shape['n_routed_experts']}, k = {shape['top_k']}, d_expert = "
                     f"{shape['d_expert']} | {' | '.join(cells)} | {t['value']:.2f}× | ≤ {t['target']}× | "
                     f"{yes(t['met'])} |")
    stages = []
    for case, s in r["stages"].items():
        alone = s["its stages, each timed alone"]
        overhead = sum(ms for name, ms in alone.items() if not name.startswith("expert"))
        experts = alone["expert SwiGLU (grouped matmuls)"] / s["dense SwiGLU"]
        stages.append(f"{case}: routing, sorting and moving rows {overhead:.0f} ms of the grouped path's "
                      f"{s['grouped path, ms per fwd + bwd']:.0f} ms; the experts' grouped matmuls alone "
                      f"{experts:.2f}× the dense layer")
    lines += ["", "Targets met: " + (", ".join(t["name"] for t in r["targets"] if t["met"]) or "none") + ".",
              "Targets missed: " + (", ".join(t["name"] for t in r["targets"] if not t["met"]) or "none") + ".",
              "Stages, each timed alone (forward + backward): " + "; ".join(stages) + "."]
    return "\n".join(lines)


def train_throughput_block(r: dict) -> str:
    lines = ["| model | parameters (active / total) | ms per step | tokens/s | relative to dense |",
             "|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {row['active']:,d} / {row['total']:,d} | {row['step_ms']:.1f} | "
                     f"{row['tokens_per_second']:,d} | {row['relative_to_dense']:.2f}× |")
    t = r["targets"][0]
    lines += ["", f"Target: {t['name']} {t['op']} {t['target']}; measured {t['value']:.2f}: "
              f"{'met' if t['met'] else 'missed'}."]
    return "\n".join(lines)


def expert_parallel_block(r: dict) -> str:
    lines = ["| ranks | router bias on rank 0's experts | rows per rank, max / mean | ms per step (slowest rank) "
             "| vs 1 rank | payload B/token (analytic) | off-rank B/token | time in all-to-all |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['ranks']} | {row['skew']:g} | {row['rows_max_over_mean']:.2f} | {row['step_ms']:.1f} | "
                     f"{row['relative_to_1_rank']:.2f}× | {row['payload_bytes_per_token']:,.0f} "
                     f"({row['analytic_bytes_per_token']:,d}) | {row['off_rank_bytes_per_token']:,.0f} | "
                     f"{row['comm_share']:.0%} |")
    met = [t for t in r["targets"] if t["met"]]
    lines += ["", f"Target: payload bytes per token equal to the analytic count on every number of ranks: "
              f"{len(met)} of {len(r['targets'])} met. Measured on {r['cpu_count']} cores, one thread per rank."]
    return "\n".join(lines)


def collectives_block(r: dict) -> str:
    sizes = sorted({row["bytes"] for row in r["rows"]})
    lines = ["| collective | algorithm | " + " | ".join(_size(s) for s in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for collective, algorithm in dict.fromkeys((row["collective"], row["algorithm"]) for row in r["rows"]):
        by_size = {row["bytes"]: row for row in r["rows"] if (row["collective"], row["algorithm"]) ==
                   (collective, algorithm)}
        lines.append(f"| {collective} | {algorithm} | " + " | ".join(f"{by_size[s]['bus_gb_s']:.3f}" for s in sizes)
                     + " |")
    worst = max(r["emulated"], key=lambda e: abs(e["ratio"] - 1))
    lines += ["", "Bus bandwidth in GB/s (nccl-tests' definition), 4 ranks. " + _targets(r),
              f"α-β model against emulated links: {len(r['emulated'])} cases, worst {worst['algorithm']} at "
              f"{_size(worst['bytes'])} ({worst['network']}): measured {worst['measured_ms']:.1f} ms, predicted "
              f"{worst['predicted_ms']:.1f} ms."]
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes // 2**20} MB" if nbytes >= 2**20 else f"{nbytes // 2**10} KB"


def quant_block(r: dict) -> str:
    gemm = [row for row in r["rows"] if row["kind"] == "gemm"]
    lines = [f"Raw products (operands already quantised), CPU capability `{r['cpu_capability']}`:", "",
             "| M = N = K | fp32 | bf16 | int8 (`torch._int_mm`) | int8 speed vs fp32 |", "|---|---|---|---|---|"]
    for n in dict.fromkeys(row["size"] for row in gemm):
        by = {row["dtype"]: row for row in gemm if row["size"] == n}
        lines.append(f"| {n} | {by['fp32']['ms']:.2f} ms | {by['bf16']['ms']:.2f} ms | {by['int8']['ms']:.2f} ms | "
                     f"{by['int8']['speed_vs_fp32']:.2f}× |")
    lines += ["", "| routed experts in | val loss of the course model | change | expert bytes |", "|---|---|---|---|"]
    for row in (row for row in r["rows"] if row["kind"] == "val_loss"):
        lines.append(f"| {row['scheme']} | {row['val_loss']:.5f} | {row['relative_increase']:+.4%} | "
                     f"{row['expert_bytes']:,d} |")
    payload = next(row for row in r["rows"] if row["kind"] == "payload" and row["d_model"] == 7168)
    lines += ["", f"FP8 dispatch row with 1×128 fp32 scales, hidden 7168: {payload['fp8_bytes']:,d} B, "
              f"{payload['vs_fp32']:.3f}× fp32, {payload['vs_bf16']:.3f}× bf16.", _targets(r)]
    return "\n".join(lines)


def fp8_training_block(r: dict) -> str:
    lines = ["| run | seed | val loss at the end | vs fp32 (same seed) |", "|---|---|---|---|"]
    for row in (row for row in r["rows"] if row["kind"] == "race"):
        lines.append(f"| {row['run']} | {row['seed']} | {row['val_loss']:.4f} | {row['val_vs_fp32']:+.2%} |")
    lines += ["", "| one layer, recipe | result | moelab vs torchao (max diff / max) | moelab vs fp32 | "
              "torchao vs fp32 |", "|---|---|---|---|---|"]
    for row in (row for row in r["rows"] if row["kind"] == "one_layer"):
        for name in ("output", "input_grad", "weight_grad"):
            lines.append(f"| {row['recipe']} | {name.replace('_', ' ')} | {row[name + '_max_diff']:.1e} | "
                         f"{row[name + '_moelab_vs_fp32']:.2%} | {row[name + '_torchao_vs_fp32']:.2%} |")
    lines += ["", "| K | rounding | max relative error, 14-bit accumulator | promoted to fp32 every 128 |",
              "|---|---|---|---|"]
    for row in (row for row in r["rows"] if row["kind"] == "accumulation"):
        lines.append(f"| {row['K']} | {row['rounding'].replace('_', ' ')} | {row['without_promotion']:.2e} | "
                     f"{row['promoted_every_128']:.2e} |")
    return "\n".join(lines + [_targets(r)])


def fp8_outliers_block(r: dict) -> str:
    rows = r["rows"]
    errors = {recipe: [row[f"error_{recipe}"] for row in rows] for recipe in ("fine", "rowwise", "tensorwise")}
    return (f"The race's fp32 model after 300 steps has no outlier channels: over the inputs of its {len(rows)} "
            f"converted products the largest channel's amax is at most "
            f"{max(row['largest_over_median_channel'] for row in rows):.1f}× the median channel's, and the forward "
            "product's relative error in FP8 is " + ", ".join(f"{min(v):.2%}–{max(v):.2%} {recipe}"
                                                                for recipe, v in errors.items())
            + " (`benchmarks/fp8_outliers.py`). Notebook 09 makes outlier channels by hand to show where the "
              "recipes part.")


def overlap_block(r: dict) -> str:
    rows = r["rows"]
    lines = ["| EP, two blocks on 2 nodes × 2 ranks | step (ms) | compute (ms) | all-to-alls (ms) |",
             "|---|---|---|---|"]
    for row in (row for row in rows if row["kind"] == "ep"):
        lines.append(f"| {row['variant']} | {1e3 * row['seconds']:.1f} | {1e3 * row['compute']:.1f} | "
                     f"{1e3 * row['comm']:.1f} |")
    lines += ["", "| DP step, 2 nodes over the slow link | step (ms) | all-reduce (ms) | buckets | hidden |",
              "|---|---|---|---|---|"]
    for row in (row for row in rows if row["kind"] == "dp"):
        lines.append(f"| {row['way']} | {1e3 * row['seconds']:.0f} | {1e3 * row['link']:.0f} | {row['buckets']} | "
                     f"{max(row['hidden'], 0.0):.0%} |")
    lines += ["", f"| schedule, {r['stages']} stages, {r['microbatches']} micro-batches | F / B / W (ms) | idle "
              "share (mean of ranks) | formula | micro-batches held | parameters per rank |",
              "|---|---|---|---|---|---|"]
    for row in (row for row in rows if row["kind"] == "pipeline"):
        lines.append(f"| {row['schedule']} | {row['F_ms']:.1f} / {row['B_ms']:.1f} / {row['W_ms']:.1f} | "
                     f"{row['bubble']:.3f} | {row['formula']:.3f} | {row['held']} | "
                     f"{max(row['parameters']) / 1e6:.2f} M |")
    return "\n".join(lines + [_targets(r)] + _why_missed(r))


def slow_link_block(r: dict) -> str:
    c = r["config"]
    lines = [f"{c['steps']} optimizer steps on {c['nodes']} nodes × {c['per_node']} ranks (between nodes: α "
             f"{1e3 * c['inter']['alpha']:g} ms, {c['inter']['beta'] / 1e6:g} MB/s), {c['batch_size']} sequences of 64 "
             f"per rank per step, H = {c['H']}, outer Nesterov SGD lr {c['outer_lr']:g} momentum "
             f"{c['outer_momentum']:g}, PowerSGD rank {c['powersgd_rank']} from step {c['powersgd_start']}:", "",
             "| method | final val loss | vs DDP | bytes sent, all ranks (= analytic) | × DDP | simulated wall-clock |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| `{row['method']}`: {row['description']} | {row['val_loss']:.4f} | {row['val_vs_ddp']:+.1%} | "
                     f"{row['sent_bytes']:,d} ({'=' if row['sent_bytes'] == row['analytic_bytes'] else '≠'}) | "
                     f"{row['bytes_vs_ddp']:.4f} | {row['simulated_seconds']:.0f} s |")
    variant = r["diloco_momentum_09"]
    lines += ["", f"DiLoCo with OpenDiLoCo's outer momentum {variant['outer_momentum']:g} instead: final val loss "
                  f"{variant['val_loss']:.4f} ({variant['val_vs_ddp']:+.1%} vs DDP).", _targets(r)]
    return "\n".join(lines)


def fragmented_block(r: dict) -> str:
    rows = {kind: [row for row in r["rows"] if row["kind"] == kind] for kind in
            ("unequal", "stragglers", "streaming", "failure", "zero")}
    lines = ["| one of 4 ranks at half speed | sequences per rank | final val loss | simulated time |",
             "|---|---|---|---|"]
    lines += [f"| split {row['split']} | {row['shares']} | {row['val']:.4f} | {row['seconds']:.2f} s |"
              for row in rows["unequal"]]
    lines += ["", "| random stragglers (p 0.1, 4× slower) | steady | with stragglers | extra |", "|---|---|---|---|"]
    lines += [f"| {row['method']}, {row['steps']} steps | {row['steady_seconds']:.2f} s | "
              f"{row['straggler_seconds']:.2f} s | {row['extra_seconds']:+.2f} s |" for row in rows["stragglers"]]
    lines += ["", "| DiLoCo, 60 steps, H = 10 | final val loss | peak bytes per sync (per rank) | bytes in all |",
              "|---|---|---|---|"]
    lines += [f"| {row['method']} | {row['val']:.4f} | {row['peak_bytes']:,d} | {row['total_bytes']:,d} |"
              for row in rows["streaming"]]
    lines += ["", "| DiLoCo on 4 replicas | members per outer step | outer steps committed | final val loss |",
              "|---|---|---|---|"]
    for row in rows["failure"]:
        name = "no failure" if row["killed"] is None else f"replica {row['killed'][0]} killed, step {row['killed'][1]}"
        lines.append(f"| {name} | {[len(m) for m in row['members']]} | {row['committed']} | {row['val']:.4f} |")
    lines += ["", "| 2 nodes × 2 ranks | parameters (per rank) | gradients | optimizer | sent per step, all ranks |",
              "|---|---|---|---|---|"]
    for row in rows["zero"]:
        held = " | ".join(f"{row['held'][k] / 1e6:.2f} MB" for k in ("parameters", "gradients", "optimizer"))
        sent = ", ".join(f"{v / 1e6:.2f} MB ({k})" for k, v in sorted(row["sent_per_step"].items()))
        name = f"ZeRO-{row['stage']}" if row["stage"] else "DDP"
        lines.append(f"| {name} | {held} | {sent} |")
    return "\n".join(lines + ["", _targets(r)] + _why_missed(r))


def serving_block(r: dict) -> str:
    machine = {row["threads"]: row for row in r["rows"] if row["case"] == "machine"}
    lines = [f"Memory bandwidth (read): {machine[1]['read_bytes_per_s'] / 1e9:.1f} GB/s on one thread, "
             f"{machine[2]['read_bytes_per_s'] / 1e9:.1f} GB/s on two; decoding runs on one (this torch's CPU "
             "matrix-vector products use one thread).", "",
             "| decode, 64 cached positions | batch | measured | roofline | tokens/s | GB read per step | "
             "experts touched (uniform) |", "|---|---|---|---|---|---|---|"]
    for row in (row for row in r["rows"] if row["case"] == "roofline"):
        touched = (f"{row['distinct_experts']:.1f} ({row['distinct_experts_uniform']:.1f})"
                   if row["distinct_experts"] is not None else "—")
        lines.append(f"| {row['model']} | {row['batch']} | {row['ms']:.1f} ms | {row['model_ms']:.1f} ms | "
                     f"{row['tokens_per_s']:.0f} | {row['bytes_read'] / 1e9:.3f} | {touched} |")
    lines += ["", "| MLA decode, batch 8, 1,024 positions | cache bytes per token | ms per step |", "|---|---|---|"]
    lines += [f"| {row['attention']} | {row['cache_bytes_per_token']:,d} | {row['ms']:.1f} |"
              for row in r["rows"] if row["case"] == "mla"]
    m = next(row for row in r["rows"] if row["case"] == "mtp")
    lines += ["", "| MTP speculative decoding (committed model) | " + " | ".join(m["by_domain"])
              + " | all | speed-up |",
              "|---" * (len(m["by_domain"]) + 3) + "|",
              "| drafts accepted | " + " | ".join(f"{d['acceptance_rate']:.1%}" for d in m["by_domain"].values())
              + f" | {m['acceptance_rate']:.1%} | {m['speedup']:.2f}× |"]
    return "\n".join(lines + ["", _targets(r)] + _why_missed(r))


def capstone_block(r: dict) -> str:
    c = r["config"]
    lines = [f"{c['steps']} optimizer steps per setup on {c['nodes']} nodes × {c['per_node']} ranks (inside a node: α "
             f"{1e3 * c['intra']['alpha']:g} ms, {c['intra']['beta'] / 1e6:g} MB/s; between nodes: α "
             f"{1e3 * c['inter']['alpha']:g} ms, {c['inter']['beta'] / 1e6:g} MB/s), {c['batch_size']} sequences of "
             f"64 per rank per step, experts sharded over all ranks, DiLoCo with H = {c['H']}:", "",
             "| setup | final val loss | vs naive | MB across nodes (= analytic) | × naive | MB inside nodes | "
             "simulated wall-clock |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        exact = row["analytic_by_class"] == {"slow": row["slow_bytes"], "fast": row["fast_bytes"]}
        lines.append(f"| `{row['setup']}`: {row['description']} | {row['val_loss']:.4f} | {row['val_vs_naive']:+.1%} | "
                     f"{row['slow_bytes'] / 1e6:,.1f} ({'=' if exact else '≠'}) | {row['slow_vs_naive']:.3f} | "
                     f"{row['fast_bytes'] / 1e6:,.1f} | {row['simulated_seconds']:.0f} s |")
    return "\n".join(lines + ["", _targets(r)])


def sizing_block(r: dict) -> str:
    lines = ["| preset | parameters | active | build + count on the meta device | peak RSS (after imports) |",
             "|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['preset']} | {row['total']:,d} | {row['active']:,d} | {row['seconds']:.2f} s | "
                     f"{row['peak_rss_mb']:.0f} MB ({row['rss_after_imports_mb']:.0f} MB) |")
    return "\n".join(lines + ["", _targets(r)])


def teaching_block(r: dict) -> str:
    """The guide's table: each notebook's measured time, its longest cell, the committed results it loads
    instead of recomputing, and its checked exercises."""
    lines = ["| notebook | runs in | longest cell | loads precomputed results | checked exercises |",
             "|---|---|---|---|---|"]
    for row in (row for row in r["rows"] if row["case"][:2].isdigit()):
        text = (ROOT / "notebooks" / f"{row['case']}.ipynb").read_text(encoding="utf-8")
        loaded = set(re.findall(r"\.\./(benchmarks/results/\w+\.json)", text))
        loaded |= {f"src/moelab/experiments/results/{name}.json"       # package data, read through load_results()
                   for name in re.findall(r"from moelab\.experiments\.(\w+) import [^\"]*\bload_results\b", text)}
        loaded = sorted(loaded)
        stubs = (ROOT / "notebooks" / "exercises" / f"{row['case']}.ipynb").read_text(encoding="utf-8")
        lines.append(f"| {row['case']} | {row['seconds']:.0f} s | {row['slowest_cell_s']:.0f} s | "
                     f"{', '.join(f'`{f}`' for f in loaded) or '—'} | {stubs.count('raises-exception')} |")
    return "\n".join(lines)


def _targets(r: dict) -> str:
    return "Targets: " + "; ".join(f"{t['name']} {t['op']} {t['target']}: {t['value']} "
                                   f"({'met' if t['met'] else 'missed'})" for t in r["targets"]) + "."


BLOCKS = {"notebooks": notebooks_block, "moe_dispatch": moe_dispatch_block, "train_throughput": train_throughput_block,
          "expert_parallel": expert_parallel_block, "collectives": collectives_block, "quant": quant_block,
          "overlap": overlap_block,
          "fp8_training": fp8_training_block, "fp8_outliers": fp8_outliers_block, "slow_link": slow_link_block,
          "fragmented": fragmented_block, "serving": serving_block, "capstone": capstone_block, "sizing": sizing_block}


def _why_missed(r: dict) -> list[str]:
    """The explanations the benchmark gave for the targets it missed, as the lines that follow its targets."""
    why = [f"{t['name']}: {t['why']}" for t in r["targets"] if not t["met"] and "why" in t]
    return ["", "Why missed: " + " ".join(why)] if why else []


def fill(text: str, name: str, body: str, where: str) -> str:
    """``text`` with its one ``<!-- results:NAME -->`` block replaced by ``body``."""
    block = f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"
    text, n = re.subn(rf"<!-- results:{name} -->.*?<!-- /results:{name} -->", lambda _: block, text, flags=re.S)
    if n != 1:
        raise SystemExit(f"{where} needs exactly one <!-- results:{name} --> block, found {n}")
    return text


def main() -> None:
    TEACHING.write_text(fill(TEACHING.read_text(encoding="utf-8"), "teaching", teaching_block(load("notebooks")),
                             "docs/teaching.md"), encoding="utf-8")
    text = README.read_text(encoding="utf-8")
    for name, render in BLOCKS.items():
        text = fill(text, name, render(load(name)), "README.md")
    for row in load("notebooks")["rows"]:
        pattern = rf"(\[`notebooks/{row['case']}\.ipynb`\].*\| )[0-9.]+ s( \|)$"
        text = re.sub(pattern, lambda m: f"{m[1]}{row['seconds']:.1f} s{m[2]}", text, flags=re.M)
    README.write_text(text, encoding="utf-8")
    print(f"updated {README.relative_to(ROOT)} and {TEACHING.relative_to(ROOT)} from benchmarks/results")


if __name__ == "__main__":
    main()
