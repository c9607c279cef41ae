"""Send a rank function and its arguments to fresh processes by value, so that one written in a notebook runs there.

A spawned rank is a new interpreter: plain pickle sends a function as "module + name", and a function defined in a
notebook cell lives in ``__main__``, which the rank does not have. ``cloudpickle`` (the serialiser Dask, Ray and
PySpark ship functions with) sends such a function by value instead: its code, defaults and closure, and the globals
it reads (a helper or a constant from another cell), while functions of installed modules still travel by reference.
The notebook's cell sources travel too, so that a rank's traceback shows the learner's lines, labelled as IPython
labels them (``Cell In[12], line 3``), instead of a temporary file name with no source.

What cannot be sent is refused before any process starts, with the name of what failed: a global the function reads
that is not defined (the rank would have it no more than the notebook does), or a value pickle cannot carry (an
open file, a lock, a generator, a process group): such things are made inside the rank function.
"""
from __future__ import annotations

import builtins
import dis
import linecache
import re
import types
from typing import Any, Callable

import cloudpickle

Sources = dict[str, tuple[str, list[str]]]      # compiled file name -> (IPython's label, source lines)


def _read_globals(fn: types.FunctionType) -> set[str]:
    """Global names the code of ``fn`` reads, nested functions and comprehensions included."""
    names, stack = set(), [fn.__code__]
    while stack:
        code = stack.pop()
        names |= {ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return names


def notebook_functions(fn: Callable):
    """``fn`` and every function of ``__main__`` it reaches through its globals: helpers, and classes' methods."""
    seen, stack = set(), [fn]
    while stack:
        f = stack.pop()
        if f in seen or not isinstance(f, (type, types.FunctionType)):
            continue
        seen.add(f)
        if isinstance(f, type):
            stack.extend(getattr(m, "__func__", m) for m in vars(f).values())
            continue
        yield f
        for name in _read_globals(f):
            value = f.__globals__.get(name)
            if getattr(value, "__module__", None) == "__main__":
                stack.append(value)


def missing_globals(fn: Callable) -> list[str]:
    """``name (in function)`` for each global that ``fn``, or a notebook function it calls, reads but nobody defines."""
    return [f"{name} (in {f.__qualname__})" for f in notebook_functions(fn) for name in sorted(_read_globals(f))
            if name not in f.__globals__ and not hasattr(builtins, name)]


def _with_filename(code: types.CodeType, filename: str) -> types.CodeType:
    consts = tuple(_with_filename(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def cell_sources() -> Sources:
    """The notebook's cells as IPython compiled them; empty outside IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return {}
    shell = get_ipython()
    numbers = getattr(getattr(shell, "compile", None), "_filename_map", {})
    return {name: (f"Cell In[{n}]", linecache.cache[name][2]) for name, n in numbers.items() if name in linecache.cache}


def pack(fn: Callable, args: tuple) -> bytes:
    """``(fn, args, cell sources)`` as bytes a rank can load; a clear error when something cannot be sent."""
    label = getattr(fn, "__qualname__", repr(fn))
    missing = missing_globals(fn)
    if missing:
        raise NameError(f"rank_fn {label!r} reads globals that are not defined: {', '.join(missing)}; the ranks "
                        f"would not have them either. Allowed: run the cell that defines them, or pass them in args")
    for what, value in [(f"rank_fn {label!r}", fn), *((f"args[{i}]", a) for i, a in enumerate(args))]:
        try:
            cloudpickle.dumps(value)
        except Exception as error:  # noqa: BLE001 — pickling raises many types; all mean "cannot be sent"
            raise TypeError(f"{what} cannot be sent to the ranks ({type(error).__name__}: {error}). Allowed: "
                            f"functions, tensors, numbers, strings and containers of them; make open files, locks, "
                            f"generators or process groups inside the rank function") from None
    # cloudpickle sends code without its file name; the rank puts it back, so that tracebacks find the cells' lines
    filenames = {f.__qualname__: f.__code__.co_filename for f in notebook_functions(fn)}
    return cloudpickle.dumps((fn, tuple(args), cell_sources(), filenames))


def unpack(blob: bytes) -> tuple[Callable, tuple, Sources]:
    """In the rank: the function and arguments, with the cells' lines put where tracebacks look for them."""
    fn, args, sources, filenames = cloudpickle.loads(blob)
    for f in notebook_functions(fn):
        if f.__qualname__ in filenames:
            f.__code__ = _with_filename(f.__code__, filenames[f.__qualname__])
    for name, (_, lines) in sources.items():
        linecache.cache[name] = (sum(map(len, lines)), None, lines, name)
    return fn, args, sources


def relabel(traceback_text: str, sources: Sources) -> str:
    """A traceback with each cell's file name replaced by its label: ``Cell In[12], line 3``."""
    for name, (label, _) in sources.items():
        traceback_text = re.sub(rf'File "{re.escape(name)}", line', f"{label}, line", traceback_text)
    return traceback_text


def result_bytes(result: Any, save: Callable[[Any], bytes]) -> bytes:
    """What a rank returns, as bytes; a clear error naming what could not be sent back."""
    try:
        return save(result)
    except Exception as error:  # noqa: BLE001 — as in pack
        raise TypeError(f"the rank function returned a {type(result).__name__} that cannot be sent back "
                        f"({type(error).__name__}: {error}). Allowed: tensors, numbers, strings and lists, "
                        f"tuples or dicts of them") from None
