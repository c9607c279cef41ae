"""The portable comparison of notebook outputs lets the last printed digits of floats move, and nothing else:
a real change (a loss off by 5%, a byte count off by one, a shape, a line of text) still fails."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbval_portable import (
    TOLERANCES,
    PortableConfigError,
    cell_kind,
    compare_numbers,
    compare_outputs,
    compare_text,
    last_digit,
    mode,
    reference_platform,
    this_platform,
)

ROOT = Path(__file__).resolve().parents[1]
TRAINED = "step  100   train 1.176   val 1.176\nstep  200   train 0.912   val 0.954"


def stream(text: str) -> list[dict]:
    return [{"output_type": "stream", "stdout": text}]


@pytest.mark.parametrize("token, unit", [("1.176", 1e-3), ("12", 1.0), ("1.5e-04", 1e-5), ("1,574,784.5", 0.1)])
def test_last_digit_is_one_unit_of_the_last_printed_place(token, unit):
    assert last_digit(token) == pytest.approx(unit)


def test_the_reference_platform_is_this_machine_with_the_default_settings():
    here = this_platform()
    assert set(here) == set(reference_platform()) and here["threads"] >= 1


def test_auto_is_exact_only_on_the_reference_platform():
    ref = {"machine": "x86_64", "cpu_capability": "AVX512", "torch": "2.13.0+cpu", "threads": 2}
    assert mode({}, here=dict(ref), reference=ref) == "exact"
    assert mode({}, here={**ref, "cpu_capability": "AVX2"}, reference=ref) == "portable"
    assert mode({}, here={**ref, "threads": 8}, reference=ref) == "portable"
    assert mode({"MOELAB_NBVAL": "exact"}, here={**ref, "machine": "arm64"}, reference=ref) == "exact"
    assert mode({"MOELAB_NBVAL": "portable"}, here=dict(ref), reference=ref) == "portable"


def test_a_bad_mode_or_tag_is_named_with_what_is_allowed():
    with pytest.raises(PortableConfigError, match=r"MOELAB_NBVAL = 'loose' is not allowed; allowed: auto, exact, "):
        mode({"MOELAB_NBVAL": "loose"})
    with pytest.raises(PortableConfigError, match=r"'portable-rough' is not allowed; allowed: portable-trained, "):
        cell_kind(["portable-rough"])
    with pytest.raises(PortableConfigError, match="more than one kind"):
        cell_kind(["portable-noisy", "portable-trained"])
    assert cell_kind([]) == "exact" and cell_kind(["raises-exception", "portable-trained"]) == "trained"


def test_a_training_loss_may_move_in_its_last_digits_but_not_by_five_percent():
    wobble = TRAINED.replace("train 1.176   val 1.176", "train 1.178   val 1.177")
    assert compare_text(TRAINED, wobble, "trained") is None
    moved = TRAINED.replace("val 0.954", f"val {0.954 * 1.05:.3f}")
    problem = compare_text(TRAINED, moved, "trained")
    assert problem.startswith("line 2, 0.954 stored, 1.002 computed: they differ by 0.048 (4.79%)")


@pytest.mark.parametrize("kind", [k for k, t in TOLERANCES.items() if t.rel is not None])
def test_every_compared_kind_fails_a_changed_line_of_text_or_a_missing_line(kind):
    assert compare_text(TRAINED, TRAINED.replace("val", "test"), kind).startswith("line 1 differs")
    assert compare_text(TRAINED, TRAINED.split("\n")[0], kind) == "1 lines computed, 2 lines stored"


@pytest.mark.parametrize("kind", ["exact", "trained", "noisy"])
def test_byte_counts_and_shapes_stay_exact(kind):
    assert compare_text("sends 1,574,784 B", "sends 1,574,785 B", kind) is not None
    assert compare_text("torch.Size([4, 16, 32])", "torch.Size([4, 16, 33])", kind) is not None


def test_exact_cells_allow_nothing_and_sample_cells_compare_only_which_outputs_they_made():
    assert compare_text("error 0.0123", "error 0.0123", "exact") is None
    assert compare_text("error 0.0123", "error 0.0124", "exact") is not None
    assert compare_text("70+44=10 (true: 114)", "70+44=120  (true: 114)\nmore", "sample") is None
    error = [{"output_type": "error", "ename": "ValueError", "evalue": "x"}]
    assert compare_outputs(stream("70+44=10"), error, "sample").startswith("output fields")


def test_an_integer_never_matches_a_float():
    assert "one is an integer" in compare_numbers("12", "12.0", TOLERANCES["trained"])


def test_signs_and_arithmetic_in_text_are_read_as_printed():
    assert compare_text("12+30=42 (true: 42)", "12+30=43 (true: 42)", "trained") is not None
    assert compare_text("val - dense -0.012", "val - dense +0.012", "trained") is not None


def test_outputs_compare_field_by_field():
    stored = stream(TRAINED) + [{"output_type": "execute_result", "data": {"text/plain": "0.5"}}]
    assert compare_outputs(stored, stored, "exact") is None
    assert compare_outputs(stored, stream(TRAINED), "trained").startswith("output fields ['stdout'] computed")
    assert compare_outputs(stored, stored + stream("x"), "trained").startswith("2 outputs of stdout computed")


def write_notebook(path: Path, printed: str, stored: str, tags: list[str]) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(f"print({printed!r})", execution_count=1, metadata={"tags": tags},
                                     outputs=[nbformat.v4.new_output("stream", name="stdout", text=stored + "\n")])
    nb.cells.append(cell)
    nbformat.write(nb, path)


@pytest.mark.slow
def test_nbval_passes_a_moved_last_digit_only_in_portable_mode_and_fails_a_moved_loss_in_both(tmp_path):
    write_notebook(tmp_path / "wobble.ipynb", "train 1.178", "train 1.176", ["portable-trained"])
    write_notebook(tmp_path / "moved.ipynb", "train 1.235", "train 1.176", ["portable-trained"])
    write_notebook(tmp_path / "bytes.ipynb", "sent 1,025 B", "sent 1,024 B", [])
    results = {}
    for chosen in ("exact", "portable"):
        env = {**os.environ, "MOELAB_NBVAL": chosen, "PYTHONPATH": str(ROOT)}
        run = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.nbval_portable", "-p", "no:cacheprovider",
                              "--nbval", "--nbval-current-env", "-rA", "--rootdir", str(tmp_path), str(tmp_path)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        results[chosen] = {line.split()[0] + " " + line.split()[1].split("::")[0]
                           for line in run.stdout.splitlines() if line.startswith(("PASSED", "FAILED"))}
        assert f"notebook outputs: {chosen} comparison" in run.stdout
    assert results["exact"] == {"FAILED wobble.ipynb", "FAILED moved.ipynb", "FAILED bytes.ipynb"}
    assert results["portable"] == {"PASSED wobble.ipynb", "FAILED moved.ipynb", "FAILED bytes.ipynb"}


def test_every_tag_in_the_notebooks_names_a_kind():
    for path in sorted(ROOT.glob("notebooks/**/*.ipynb")):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            cell_kind(cell.get("metadata", {}).get("tags", []))
