"""One figure, one source: numbers the course quotes in several places agree with the code or JSON they come from.

Each test recomputes a figure from moelab (or reads the committed benchmark JSON) and finds every place that quotes
it: the notebooks' stored outputs and markdown, the README, docs/teaching.md and docs/glossary.md. A drift (a
config changed, a formula fixed in one notebook only, a run added but not described) fails here by name.
"""
import json
import re
from pathlib import Path

from moelab import presets
from moelab.wire import row_bytes

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NUMBER_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def printed(cell: dict) -> str:
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []))


def everything() -> dict[str, str]:
    """Every notebook's markdown and stored outputs, the README and the docs, by name."""
    texts = {p.relative_to(ROOT / "notebooks").as_posix(): "\n".join(source(c) if c["cell_type"] == "markdown"
                                                                     else printed(c) for c in cells(p))
             for p in CHAPTERS + sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))}
    for name in ("README.md", "docs/teaching.md", "docs/glossary.md"):
        texts[name] = (ROOT / name).read_text(encoding="utf-8")
    return texts


def test_deepseek_v3_fp8_dispatch_traffic_is_one_figure_everywhere():
    """4096 tokens a device, d_model 7168, k = 8 copies (or M = 4 nodes), FP8 dispatch with its scales + BF16
    combine: the bytes of a row from moelab.wire, as notebooks 00 and 05 print them."""
    row = row_bytes(7168, "fp8") + row_bytes(7168, "bf16")
    per_expert, per_node = round(4096 * 8 * row / 1e6), round(4096 * 4 * row / 1e6)
    found = []
    for name, text in everything().items():
        found += [(name, int(mb), per_expert) for mb in re.findall(r"FP8 dispatch, BF16 combine +(\d+) MB", text)]
        found += [(name, int(mb), per_node) for mb in re.findall(r"≤ (\d+) MB per MoE layer forward over InfiniBand",
                                                                 text)]
        found += [(name, int(mb), per_node) for mb in re.findall(r"copy per node \(M = 4\), FP8 dispatch +≤ +(\d+) MB",
                                                                 text)]
        found += [(name, int(mb), per_expert) for mb in re.findall(r"copy per expert, FP8 dispatch +≤ +(\d+) MB", text)]
        found += [(name, int(mb), per_expert) for mb in re.findall(r"the (\d+) MB of section 7", text)]
    assert {name for name, _, _ in found} >= {"00_orientation.ipynb", "05_expert_parallelism.ipynb"}
    assert [(name, mb) for name, mb, want in found if mb != want] == [], f"expected {per_expert} / {per_node} MB"


def test_deepseek_v3_active_parameters_are_one_of_the_two_named_conventions():
    """With the input embedding row a token reads (notebooks 00 and 04), or without it (09, the V3 report); the
    report's own 36.7 B, quoted as such ("vs 36.7 B", "DeepSeek's 36.7 B"), is left aside."""
    counts = presets.analytic_counts(presets.deepseek_v3())
    allowed = {counts["active"] / 1e9, (counts["active"] - counts["embedding"]) / 1e9}
    quoted = [(name, m[1]) for name, text in everything().items()
              for m in re.finditer(r"(?<![\d.])(3[67]\.\d{1,2}) ?(?:B|GB)\b", text)
              if not re.search(r"(vs|DeepSeek's) $", text[max(0, m.start() - 11):m.start()])]   # published figures
    assert quoted, "no DeepSeek-V3 active count found"
    wrong = [(name, q) for name, q in quoted
             if not any(round(a, len(q.split(".")[1])) == float(q) for a in allowed)]
    assert wrong == [], f"allowed: {sorted(round(a, 2) for a in allowed)} B"


def test_the_number_of_balancing_runs_is_the_number_notebook_03_trains():
    runs = next(printed(c).count("final val loss") for c in cells(ROOT / "notebooks" / "03_load_balancing.ipynb")
                if "final val loss" in printed(c))
    texts = everything()
    quoted = {"03 intro": re.search(r"Then (\w+) short training runs", texts["03_load_balancing.ipynb"]),
              "README": re.search(r"(\w+) 400-step runs", texts["README.md"]),
              "teaching": re.search(r"(\w+) balancing runs", texts["docs/teaching.md"])}
    assert {where: NUMBER_WORDS.get(m[1]) if m else None for where, m in quoted.items()} == dict.fromkeys(quoted, runs)


def test_notebook_02s_stored_benchmark_lines_are_the_committed_results():
    """Notebook 02 shows benchmarks/results/moe_dispatch.json's targets (a cell the tests otherwise ignore)."""
    bench = json.loads((ROOT / "benchmarks" / "results" / "moe_dispatch.json").read_text(encoding="utf-8"))
    cell = next(c for c in cells(ROOT / "notebooks" / "02_moe_layer.ipynb") if "moe_dispatch.json" in source(c))
    expected = "".join(f"{t['name']}: {t['value']:.2f} (target {t['op']} {t['target']}, "
                       f"{'met' if t['met'] else 'missed'})\n" for t in bench["targets"])
    assert printed(cell) == expected, "rerun notebook 02 (make execute) after benchmarks/moe_dispatch.py"


def test_each_chapters_time_to_run_is_its_measured_time():
    """The "Time to run: about N s" a chapter opens with is its time in benchmarks/results/notebooks.json, to 5 s."""
    rows = json.loads((ROOT / "benchmarks" / "results" / "notebooks.json").read_text(encoding="utf-8"))["rows"]
    measured = {r["case"]: r["seconds"] for r in rows if r["case"][:2].isdigit()}
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        opening = "".join(json.loads(path.read_text(encoding="utf-8"))["cells"][0]["source"])
        found = re.search(r"\*\*Time to run:\*\* about (\d+) s", opening)
        if found:
            assert abs(int(found[1]) - measured[path.stem]) <= 5, (path.name, found[0], measured[path.stem])
