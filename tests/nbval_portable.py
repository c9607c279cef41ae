"""Portable nbval: stored outputs compared exactly on the reference platform, number by number elsewhere.

A training run sums floats in an order set by the CPU's vector kernels (AVX-512, AVX2, ARM) and the thread count,
and a few hundred optimizer steps carry the last bits into the printed digits. So on the platform that recorded the
outputs (``notebooks/reference_platform.json``) nbval compares text exactly, as it always did; anywhere else a cell's
text must still be identical once its numbers are taken out, and the numbers are compared with the tolerance of the
cell's kind (``TOLERANCES``). A cell's kind is its tag; untagged cells are ``exact`` everywhere.

``MOELAB_NBVAL`` picks the mode: ``auto`` (the default: exact on the reference platform, portable elsewhere),
``exact`` or ``portable``.
"""
from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.notebook import DEFAULT_THREADS

REFERENCE = Path(__file__).resolve().parents[1] / "notebooks" / "reference_platform.json"
MODES = ("auto", "exact", "portable")
TAG_PREFIX = "portable-"

# A number as the notebooks print it: an optional sign not glued to a word ("12+30" is 12 and 30), digits with
# optional thousands separators, an optional fraction and exponent.
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Tolerance:
    """How far the floats printed by a cell of one kind may move on another platform.

    ``rel`` is relative to the larger of the two values, on top of one unit of the last printed digit (a value that
    moved in its last bits can round either way). Integers (counts, bytes, shapes) never move. ``rel = None``
    compares no line: only which outputs the cell made.
    """

    rel: float | None
    why: str


# Each bound is at most twice the largest move measured between the CPU capabilities tried, on top of the last-digit
# allowance (benchmarks/portable.py records the measurements in benchmarks/results/portable.json).
TOLERANCES = {
    "exact": Tolerance(
        0.0, "counts, bytes, shapes, parameter totals, analytic results and forward passes: no cell of this kind "
             "moved under other kernels, so the text must be identical"),
    "trained": Tolerance(
        0.0175, "losses of a model trained in the notebook (or by ranks it launches), and ratios of them: hundreds of "
              "steps carry last-bit differences into the printed digits, about 1% at most; integers stay exact"),
    "noisy": Tolerance(
        0.25, "numbers at the level of run-to-run noise: a training run's routing statistics (how the tokens spread "
             "over experts is chaotic without balancing) and the difference between two trained losses"),
    "sample": Tolerance(
        None, "text a trained model generates: one token chosen differently changes every token after it, so off "
              "the reference platform the cell must run and print the same outputs, whatever they say"),
}


class PortableConfigError(ValueError):
    """A bad MOELAB_NBVAL value or cell tag, named with what is allowed."""


def this_platform() -> dict:
    """What the stored outputs depend on: architecture, ATen's CPU kernels, torch and the notebooks' thread count."""
    return {"machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "threads": int(os.environ.get("MOELAB_THREADS", str(DEFAULT_THREADS)))}


def reference_platform(path: Path = REFERENCE) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def mode(environ=os.environ, here: dict | None = None, reference: dict | None = None) -> str:
    """``exact`` or ``portable``, from ``MOELAB_NBVAL`` and whether this is the reference platform."""
    chosen = environ.get("MOELAB_NBVAL", "auto")
    if chosen not in MODES:
        raise PortableConfigError(f"MOELAB_NBVAL = {chosen!r} is not allowed; allowed: {', '.join(MODES)}")
    if chosen != "auto":
        return chosen
    here = this_platform() if here is None else here
    reference = reference_platform() if reference is None else reference
    return "exact" if here == reference else "portable"


def cell_kind(tags) -> str:
    """The kind named by a cell's ``portable-<kind>`` tag; ``exact`` without one."""
    kinds = [t[len(TAG_PREFIX):] for t in tags if t.startswith(TAG_PREFIX)]
    for kind in kinds:
        if kind not in TOLERANCES:
            raise PortableConfigError(f"cell tag '{TAG_PREFIX}{kind}' is not allowed; allowed: "
                                      + ", ".join(TAG_PREFIX + k for k in TOLERANCES if k != "exact"))
    if len(kinds) > 1:
        raise PortableConfigError(f"cell tags {kinds} name more than one kind; allowed: one")
    return kinds[0] if kinds else "exact"


def value(token: str) -> float:
    return float(token.replace(",", ""))


def is_float(token: str) -> bool:
    return "." in token or "e" in token.lower()


def last_digit(token: str) -> float:
    """One unit of the last digit a float was printed with: 0.001 for ``1.176``, 1e-05 for ``1.5e-04``."""
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def changed_lines(stored: str, computed: str):
    """Each line that differs: (line number, stored, computed, its pairs of numbers, or None when words differ too).

    A different number of lines is one change, numbered 0, that says so.
    """
    stored_lines, computed_lines = stored.split("\n"), computed.split("\n")
    if len(stored_lines) != len(computed_lines):
        yield 0, f"{len(stored_lines)} lines", f"{len(computed_lines)} lines", None
        return
    for n, (a, b) in enumerate(zip(stored_lines, computed_lines), 1):
        if a != b:
            same_words = NUMBER.sub("#", a) == NUMBER.sub("#", b)
            yield n, a, b, list(zip(NUMBER.findall(a), NUMBER.findall(b))) if same_words else None


def compare_text(stored: str, computed: str, kind: str) -> str | None:
    """None when ``computed`` matches ``stored`` for a cell of ``kind``; else the first difference, in words."""
    tolerance = TOLERANCES[kind]
    if tolerance.rel is None:
        return None
    for n, a, b, numbers in changed_lines(stored, computed):
        if n == 0:
            return f"{b} computed, {a} stored"
        if kind == "exact":
            return f"line {n} differs, in a cell compared exactly everywhere:\n  stored:   {a}\n  computed: {b}"
        if numbers is None:
            return f"line {n} differs in its text:\n  stored:   {a}\n  computed: {b}"
        for x, y in numbers:
            problem = compare_numbers(x, y, tolerance)
            if problem:
                return f"line {n}, {problem} (kind {kind!r}):\n  stored:   {a}\n  computed: {b}"
    return None


def compare_numbers(stored: str, computed: str, tolerance: Tolerance) -> str | None:
    """None when two printed numbers agree within ``tolerance``; else what differs."""
    if is_float(stored) != is_float(computed):
        return f"{stored} stored, {computed} computed: one is an integer, the other not"
    a, b = value(stored), value(computed)
    if a == b:
        return None
    scale = max(abs(a), abs(b))
    if not is_float(stored):
        return f"{stored} stored, {computed} computed: integers (counts, bytes, shapes) must match"
    allowed = tolerance.rel * scale + max(last_digit(stored), last_digit(computed))
    if abs(a - b) <= allowed * (1 + 1e-9):
        return None
    return (f"{stored} stored, {computed} computed: they differ by {abs(a - b):.3g} "
            f"({abs(a - b) / scale:.2%}), more than the {allowed:.3g} allowed")


def flatten(outputs, skip, sanitize) -> dict[str, list[str]]:
    """Each compared output field (a stream's text, a MIME type of a result, an error) and its values in order."""
    fields: dict[str, list[str]] = {}
    for out in outputs:
        for key, value in out.items():
            if key in skip:
                continue
            items = value.items() if key == "data" else [(key, value)]
            for field, v in items:
                if field not in skip:
                    v = "".join(v) if isinstance(v, list) else v
                    fields.setdefault(field, []).append(sanitize(v) if isinstance(v, str) else json.dumps(v))
    return fields


NBVAL_SKIP = ("metadata", "traceback", "prompt_number", "output_type", "name", "execution_count")


def compare_outputs(stored, computed, kind: str, skip=NBVAL_SKIP, sanitize=lambda s: s) -> str | None:
    """None when a cell's computed outputs match its stored ones for its kind; else the first difference."""
    a, b = flatten(stored, skip, sanitize), flatten(computed, skip, sanitize)
    if set(a) != set(b):
        return f"output fields {sorted(b)} computed, {sorted(a)} stored"
    for field in a:
        if len(a[field]) != len(b[field]):
            return f"{len(b[field])} outputs of {field} computed, {len(a[field])} stored"
        for x, y in zip(a[field], b[field]):
            problem = compare_text(x, y, kind)
            if problem:
                return f"{field}: {problem}"
    return None


def pytest_configure(config):
    """In portable mode, let a cell that nbval's exact comparison fails pass if it matches for its kind."""
    chosen = mode()
    config._moelab_nbval_mode = chosen
    if chosen == "exact" or not config.pluginmanager.hasplugin("nbval"):
        return
    from nbval.plugin import IPyNbCell, transform_streams_for_comparison

    exact = IPyNbCell.compare_outputs

    def portable(self, test, ref, skip_compare=None):
        if exact(self, test, ref, skip_compare):
            return True
        problem = compare_outputs(transform_streams_for_comparison(ref), transform_streams_for_comparison(test),
                                  cell_kind(self.cell.metadata.get("tags", [])),
                                  skip_compare or self.parent.skip_compare, self.sanitize)
        if problem is None:
            return True
        self.comparison_traceback = [f"portable comparison ({describe(this_platform())}): {problem}"]
        return False

    IPyNbCell.compare_outputs = portable


def describe(p: dict) -> str:
    return f"{p['machine']} {p['cpu_capability']}, torch {p['torch']}, {p['threads']} threads"


def pytest_report_header(config):
    chosen = getattr(config, "_moelab_nbval_mode", mode())
    return (f"notebook outputs: {chosen} comparison (this platform: {describe(this_platform())}; "
            f"reference: {describe(reference_platform())})")
