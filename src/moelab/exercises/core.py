"""The machinery behind every exercise check: run the learner's function and moelab's on the same random inputs.

A check is one call, ``check_x(fn)``. It draws a fixed list of inputs (seeded, so a verdict is the same on every
run and nbval can compare it), calls the learner's ``fn`` and the library's reference on a fresh copy of each,
and returns a :class:`Verdict` that Jupyter shows as one line: ``✓`` and what was compared, or ``✗``, the first
input on which the two differ, what differs there, and a hint when the mistake is a common one.

A stub that still raises ``NotImplementedError`` is not judged: the error propagates (:func:`learner_facing` trims
its traceback to the learner's frames), so the exercise notebooks store it as the expected output of the unfilled
cell (tag ``raises-exception``).
"""
from __future__ import annotations

import copy
import functools
import math
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


@dataclass(frozen=True)
class Verdict:
    """The outcome of a check; ``bool(v)`` is whether it passed, ``repr(v)`` is the one-line message."""

    check: str
    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Case:
    """One input: keyword arguments for both functions, and how to name the input in a verdict."""

    kwargs: dict[str, Any]
    label: str


def describe(value: Any) -> str:
    """A short, stable description of an input value (tensors by shape and dtype, not by content)."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"{type(value).__name__} of {len(value)}"
    return repr(value)


def case(**kwargs: Any) -> Case:
    """A :class:`Case` labelled by its arguments, e.g. ``logits=tensor(5, 8) float32, k=2``."""
    return Case(kwargs, ", ".join(f"{k}={describe(v)}" for k, v in kwargs.items()))


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return _fmt(x.item())
    return repr(x)


def difference(expected: Any, got: Any, rtol: float = 1e-5, atol: float = 1e-6,
               where: str = "the result") -> str | None:
    """The first difference between ``expected`` and ``got``, in words, or None when they agree.

    Tensors must match in shape and (for integer and bool tensors) exactly; float tensors within
    ``atol + rtol·|expected|``. Floats follow the same rule, ints and strings must be equal, and tuples, lists and
    dicts are compared item by item.
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{where} should be a tensor, got {type(got).__name__}"
        if tuple(got.shape) != tuple(expected.shape):
            return f"{where} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        if expected.is_floating_point():
            e, g = expected.detach().double(), got.detach().double()
            bad = ~((g - e).abs() <= atol + rtol * e.abs())
        else:
            e, g = expected.detach(), got.detach()
            if g.is_floating_point():
                return f"{where} should hold {str(expected.dtype).removeprefix('torch.')} values, got {got.dtype}"
            bad = g != e
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            n = int(bad.sum())
            at = f"[{', '.join(map(str, idx))}]" if idx else ""
            return (f"{where}{at} is {_fmt(g[idx].item())}, expected {_fmt(e[idx].item())}"
                    f" ({n} of {e.numel()} entries differ)")
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            n = len(got) if isinstance(got, (tuple, list)) else type(got).__name__
            return f"{where} should be a {type(expected).__name__} of {len(expected)} items, got {n}"
        for i, (e, g) in enumerate(zip(expected, got)):
            found = difference(e, g, rtol, atol, f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            keys = sorted(got) if isinstance(got, dict) else type(got).__name__
            return f"{where} should be a dict with keys {sorted(expected)}, got {keys}"
        for k in expected:
            found = difference(expected[k], got[k], rtol, atol, f"{where}[{k!r}]")
            if found:
                return found
        return None
    if isinstance(expected, bool) or isinstance(expected, str) or expected is None:
        return None if got == expected else f"{where} is {_fmt(got)}, expected {_fmt(expected)}"
    if isinstance(expected, (int, float)):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return f"{where} should be a number, got {type(got).__name__}"
        if isinstance(expected, int) and not isinstance(got, float):
            return None if got == expected else f"{where} is {got:,}, expected {expected:,}"
        ok = math.isclose(got, expected, rel_tol=rtol, abs_tol=atol)
        return None if ok else f"{where} is {_fmt(float(got))}, expected {_fmt(float(expected))}"
    raise TypeError(f"expected = {type(expected).__name__} cannot be compared; allowed: tensor, number, str, "
                    "bool, None, tuple, list, dict")


def run_check(name: str, fn: Callable, reference: Callable, cases: Sequence[Case], against: str,
              rtol: float = 1e-5, atol: float = 1e-6,
              hints: Sequence[tuple[Callable, str]] = ()) -> Verdict:
    """Compare ``fn`` with ``reference`` on every case; the verdict names the first input where they differ.

    ``against`` names what the reference is (``"moelab.router.SoftmaxRouter"``). ``hints`` are pairs of a known
    wrong function and the advice to give when the learner's result equals it on the failing input: the most
    specific feedback a check can give is "your answer is what you get if you forget X".
    """
    if not callable(fn):
        raise TypeError(f"fn = {fn!r} is not allowed; allowed: the function you wrote, e.g. {name}(my_function)")
    for i, c in enumerate(cases, 1):
        expected = reference(**copy.deepcopy(c.kwargs))
        where = f"on input {i} of {len(cases)} ({c.label})"
        try:
            got = fn(**copy.deepcopy(c.kwargs))
        except NotImplementedError:
            raise
        except Exception as e:  # the learner's bug is the verdict, not a crash of the check
            return Verdict(name, False, f"✗ {name}: {where} your function raised {type(e).__name__}: {e}")
        found = difference(expected, got, rtol, atol)
        if found:
            hint = next((h for wrong, h in hints if _same(got, wrong(**copy.deepcopy(c.kwargs)), rtol, atol)), None)
            return Verdict(name, False, f"✗ {name}: {where} {found}." + (f" Hint: {hint}" if hint else ""))
    return Verdict(name, True, f"✓ {name}: agrees with {against} on {len(cases)} random inputs")


# where library code lives: moelab itself, and the interpreter's prefixes (the standard library, site-packages)
LIBRARY = (str(Path(__file__).resolve().parents[1]), sys.prefix, sys.base_prefix)


def learner_facing(check: Callable[[Callable], Verdict]) -> Callable[[Callable], Verdict]:
    """``check``, except that an unfilled stub's ``NotImplementedError`` comes out with the learner's own frames
    only: the traceback a notebook shows (and stores) points at their cell, not at moelab's files or torch's
    (a ``@torch.no_grad()`` stub), and IPython hides this wrapper's frame (it sets ``__tracebackhide__``)."""
    @functools.wraps(check)
    def wrapper(fn: Callable) -> Verdict:
        __tracebackhide__ = True                                   # noqa: F841  (read by IPython)
        try:
            return check(fn)
        except NotImplementedError as e:
            kept = []
            tb = e.__traceback__
            while tb is not None:
                if not tb.tb_frame.f_code.co_filename.startswith(LIBRARY):
                    kept.append(tb)
                tb = tb.tb_next
            trimmed = None
            for t in reversed(kept):
                trimmed = types.TracebackType(trimmed, t.tb_frame, t.tb_lasti, t.tb_lineno)
            raise e.with_traceback(trimmed) from None
    return wrapper


def _same(a: Any, b: Any, rtol: float, atol: float) -> bool:
    """Whether two answers agree, whichever is a tensor and whichever a plain number (a hint's wrong answer may
    be written either way)."""
    return difference(a, b, rtol, atol) is None or difference(b, a, rtol, atol) is None


def seeded(seed: int) -> torch.Generator:
    """A generator for a check's inputs: each check draws the same inputs on every run."""
    return torch.Generator().manual_seed(seed)
