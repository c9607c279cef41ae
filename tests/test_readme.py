"""The README opens with the two commands, maps every notebook, and quotes the measured budgets exactly."""
import importlib.util
import json
import re
from pathlib import Path

from moelab.experiments.capstone import SETUPS
from moelab.experiments.slow_link import METHODS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
RESULTS = json.loads((ROOT / "benchmarks" / "results" / "notebooks.json").read_text(encoding="utf-8"))


def test_readme_opens_with_exactly_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S)[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make lab", "make test"]
    assert README.index("```bash") < README.index("## ")  # before any section


def test_course_map_lists_every_notebook_with_its_measured_run_time():
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        row = next(line for line in README.splitlines() if f"notebooks/{path.name}" in line)
        measured = next(r for r in RESULTS["rows"] if r["case"] == path.stem)
        assert row.rstrip(" |").endswith(f"{measured['seconds']:.1f} s"), row


def test_budget_table_quotes_benchmarks_results():
    table = README[README.index("## Budgets"):README.index("## MoE dispatch speed")]
    for target in RESULTS["targets"]:
        seconds = target["name"].endswith(" s")             # the time budgets; the import-graph ones are counts
        value = f"{target['value']:.1f} s" if seconds else f"| {int(target['value'])} "
        assert value in table, f"README budgets lack the measured {value} ({target['name']})"
    assert all(t["met"] for t in RESULTS["targets"]) == ("| no |" not in table)
    if not any("fresh clone" in t["name"] for t in RESULTS["targets"]):  # a --notebooks-only run
        assert "not measured by the last run" in table


def test_moe_dispatch_table_quotes_benchmarks_results():
    results = json.loads((ROOT / "benchmarks" / "results" / "moe_dispatch.json").read_text(encoding="utf-8"))
    section = README[README.index("## MoE dispatch speed"):README.index("## MoE training speed")]
    for row in results["rows"]:
        assert f"{row['fwd_bwd_ms']:.1f} ms" in section, f"README lacks {row['case']} {row['impl']}"
    for t in (t for t in results["targets"] if "/ dense" in t["name"]):
        assert f"{t['value']:.2f}× | ≤ {t['target']}× | {'yes' if t['met'] else 'no'} |" in section, t["name"]


def test_train_throughput_table_quotes_benchmarks_results():
    results = json.loads((ROOT / "benchmarks" / "results" / "train_throughput.json").read_text(encoding="utf-8"))
    section = README[README.index("## MoE training speed"):README.index("## Expert parallelism (measured)")]
    assert {row["model"] for row in results["rows"]} == {"dense", "coarse", "fine"}
    for row in results["rows"]:
        assert f"| {row['tokens_per_second']:,d} | {row['relative_to_dense']:.2f}× |" in section, row["model"]
    (t,) = results["targets"]
    assert f"measured {t['value']:.2f}: {'met' if t['met'] else 'missed'}" in section


def test_expert_parallel_table_quotes_benchmarks_results():
    results = json.loads((ROOT / "benchmarks" / "results" / "expert_parallel.json").read_text(encoding="utf-8"))
    section = README[README.index("## Expert parallelism (measured)"):README.index("## Collectives (measured)")]
    assert {row["ranks"] for row in results["rows"]} == {1, 2, 4}
    for row in results["rows"]:
        assert row["payload_bytes_per_token"] == row["analytic_bytes_per_token"], row
        assert f"| {row['step_ms']:.1f} | {row['relative_to_1_rank']:.2f}× |" in section, row
    assert all(t["met"] for t in results["targets"]) and len(results["targets"]) == 3


def test_collectives_table_quotes_benchmarks_results():
    results = json.loads((ROOT / "benchmarks" / "results" / "collectives.json").read_text(encoding="utf-8"))
    section = README[README.index("## Collectives (measured)"):README.index("## 8-bit matmuls")]
    assert {(r["collective"], r["algorithm"]) for r in results["rows"]} >= {
        ("all_reduce", "gloo"), ("all_reduce", "ring"), ("reduce_scatter", "ring"), ("all_to_all", "pairwise")}
    for t in results["targets"]:
        assert f"{t['name']} {t['op']} {t['target']}: {t['value']}" in section, t["name"]


def test_overlap_tables_quote_benchmarks_results():
    results = json.loads((ROOT / "benchmarks" / "results" / "overlap.json").read_text(encoding="utf-8"))
    section = README[README.index("## Overlap and pipelines (measured)"):README.index("## 8-bit matmuls")]
    quoted = {"ep": lambda r: f"| {r['variant']} | {1e3 * r['seconds']:.1f} |",
              "dp": lambda r: f"| {r['way']} | {1e3 * r['seconds']:.0f} |",
              "pipeline": lambda r: f"| {r['schedule']} | {r['F_ms']:.1f} / {r['B_ms']:.1f} / {r['W_ms']:.1f} | "
                                    f"{r['bubble']:.3f} | {r['formula']:.3f} |"}
    assert {r["kind"] for r in results["rows"]} == set(quoted)
    for row in results["rows"]:
        assert quoted[row["kind"]](row) in section, row
    for t in results["targets"]:
        assert f"{t['name']} {t['op']} {t['target']}: {t['value']}" in section, t["name"]
        assert t["met"] or t["why"] in section, t["name"]          # a missed target says why


def test_slow_link_table_quotes_benchmarks_results():
    results = json.loads((ROOT / "benchmarks" / "results" / "slow_link.json").read_text(encoding="utf-8"))
    section = README[README.index("## Slow-link training (measured)"):README.index("## Other commands")]
    assert [row["method"] for row in results["rows"]] == list(METHODS)
    for row in results["rows"]:
        assert row["sent_bytes"] == row["analytic_bytes"], row["method"]
        assert f"| {row['val_loss']:.4f} | {row['val_vs_ddp']:+.1%} | {row['sent_bytes']:,d} (=) |" in section
    for t in results["targets"]:
        assert f"{t['name']} {t['op']} {t['target']}: {t['value']}" in section, t["name"]


def test_sizing_table_quotes_benchmarks_results():
    results = json.loads((ROOT / "benchmarks" / "results" / "sizing.json").read_text(encoding="utf-8"))
    section = README[README.index("## Sizing real models (measured)"):README.index("## Other commands")]
    for row in results["rows"]:
        assert f"| {row['preset']} | {row['total']:,d} | {row['active']:,d} |" in section
    for t in results["targets"]:
        assert f"{t['name']} {t['op']} {t['target']}: {t['value']}" in section, t["name"]


def test_generated_blocks_equal_what_the_report_script_renders_from_the_results():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    for name, render in report.BLOCKS.items():
        block = f"<!-- results:{name} -->\n{render(report.load(name))}\n<!-- /results:{name} -->"
        assert block in README, f"README's {name} block is stale: run python benchmarks/report.py"
    teaching = (ROOT / "docs" / "teaching.md").read_text(encoding="utf-8")
    block = f"<!-- results:teaching -->\n{report.teaching_block(report.load('notebooks'))}\n<!-- /results:teaching -->"
    assert block in teaching, "docs/teaching.md's run times are stale: run python benchmarks/report.py"


def test_capstone_table_quotes_benchmarks_results():
    results = json.loads((ROOT / "benchmarks" / "results" / "capstone.json").read_text(encoding="utf-8"))
    section = README[README.index("## Capstone: everything at once"):README.index("## Sizing real models")]
    assert [row["setup"] for row in results["rows"]] == list(SETUPS)
    for row in results["rows"]:
        assert row["analytic_by_class"] == {"slow": row["slow_bytes"], "fast": row["fast_bytes"]}, row["setup"]
        assert f"| {row['val_loss']:.4f} | {row['val_vs_naive']:+.1%} | {row['slow_bytes'] / 1e6:,.1f} (=) |" in section
    for t in results["targets"]:
        assert f"{t['name']} {t['op']} {t['target']}: {t['value']}" in section, t["name"]


def test_the_teaching_guide_plans_with_every_notebook():
    teaching = (ROOT / "docs" / "teaching.md").read_text(encoding="utf-8")
    for row in (r for r in RESULTS["rows"] if r["case"][:2].isdigit()):
        assert f"| {row['case']} | {row['seconds']:.0f} s |" in teaching, row["case"]
    for heading in ("## Before the session", "## A half-day session", "## A full-day session",
                    "## Which cells to run live", "## Common problems", "## Binder and Colab"):
        assert heading in teaching


def test_fp8_training_table_quotes_benchmarks_results():
    results = json.loads((ROOT / "benchmarks" / "results" / "fp8_training.json").read_text(encoding="utf-8"))
    section = README[README.index("## Training in 8 bits (measured)"):README.index("## Slow-link training (measured)")]
    for row in (row for row in results["rows"] if row["kind"] == "race"):
        assert f"| {row['run']} | {row['seed']} | {row['val_loss']:.4f} |" in section, row["run"]
    for t in results["targets"]:
        assert f"{t['name']} {t['op']} {t['target']}: {t['value']}" in section, t["name"]


def test_fragmented_tables_quote_benchmarks_results():
    results = json.loads((ROOT / "benchmarks" / "results" / "fragmented.json").read_text(encoding="utf-8"))
    section = README[README.index("## Fragmented clusters (measured)"):README.index("## Capstone")]
    quoted = {"unequal": lambda r: f"| split {r['split']} | {r['shares']} | {r['val']:.4f} | {r['seconds']:.2f} s |",
              "stragglers": lambda r: f"| {r['steady_seconds']:.2f} s | {r['straggler_seconds']:.2f} s |",
              "streaming": lambda r: f"| {r['method']} | {r['val']:.4f} | {r['peak_bytes']:,d} |",
              "failure": lambda r: f"| {r['committed']} | {r['val']:.4f} |",
              "zero": lambda r: f"| {r['held']['parameters'] / 1e6:.2f} MB | {r['held']['gradients'] / 1e6:.2f} MB |"}
    assert {r["kind"] for r in results["rows"]} == set(quoted)
    for row in results["rows"]:
        assert quoted[row["kind"]](row) in section, row
    for t in results["targets"]:
        assert f"{t['name']} {t['op']} {t['target']}: {t['value']}" in section, t["name"]
        assert t["met"] or t["why"] in section, t["name"]
