"""What every notebook needs: reproducible set-up, a report of this machine, and checks against the library.

Notebook outputs are compared exactly by nbval, so every notebook starts with :func:`setup`: fixed seeds and
a fixed thread count (CPU float reductions can change with the number of threads). When a notebook has built
something by hand, :func:`check_close` asserts that it equals moelab's version and prints a line that does not
depend on the machine's last digits. Built in notebooks/00_orientation.ipynb.
"""
from __future__ import annotations

import os
import platform
import random
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

# A learner's default. The outputs committed in notebooks/ were recorded with MOELAB_THREADS=1, as `make test` runs
# two notebooks side by side; with 2 threads the last digits of a trained result may differ (tests/nbval_portable.py).
DEFAULT_THREADS = 2


def setup(seed: int = 0, threads: int | None = None) -> None:
    """Seed Python, NumPy and torch, and fix torch's intra-op thread count.

    ``threads`` defaults to ``$MOELAB_THREADS`` or 2. More threads run faster on a bigger machine but may change
    the last digits of results, and so the outputs nbval compares.
    """
    if threads is None:
        raw = os.environ.get("MOELAB_THREADS", str(DEFAULT_THREADS))
        if not raw.strip().isdigit():
            raise ValueError(f"MOELAB_THREADS = {raw!r} is not allowed; allowed: an integer >= 1")
        threads = int(raw)
    if not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads = {threads!r} is not allowed; allowed: an integer >= 1")
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    _sharp_figures()


def _sharp_figures() -> None:
    """In Jupyter, draw figures as "retina" PNGs: twice the pixels (200 dpi) at the same size on the page.

    Figures keep their size in inches, so the ``<Figure size …>`` line nbval compares does not change."""
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:         # plain Python: no inline figures to render
        return
    if get_ipython() is not None:
        set_matplotlib_formats("retina")


def progress_bar(enabled: bool = True, **kwargs) -> tqdm:
    """A ``tqdm.auto`` bar (a widget in JupyterLab, text elsewhere), off when ``$TQDM_DISABLE`` is set.

    ``make test`` and ``make execute`` set ``TQDM_DISABLE=1`` so that stored notebook outputs hold no bars;
    ``tqdm.notebook`` ignores that variable by itself, hence this helper.
    """
    quiet = os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    return tqdm(disable=quiet or not enabled, **kwargs)


def environment() -> dict[str, str]:
    """Versions, threads and accelerators, as strings for a small table."""
    import matplotlib

    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "matplotlib": matplotlib.__version__,
        "cpu cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "cuda": f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}" if cuda else "not available",
        "distributed backends": ", ".join(b for b in ("gloo", "nccl") if _backend_available(b)) or "none",
    }


def _backend_available(name: str) -> bool:
    dist = torch.distributed
    return dist.is_available() and getattr(dist, f"is_{name}_available")()


def check_close(label: str, got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 0.0) -> None:
    """Assert ``|got - expected| <= atol + rtol·|expected|`` elementwise, then print a stable one-line verdict."""
    if got.shape != expected.shape:
        raise AssertionError(f"{label}: shape {tuple(got.shape)} differs from the expected {tuple(expected.shape)}")
    diff = (got.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    if not bool((diff <= bound).all()):
        worst = int((diff - bound).flatten().argmax())
        raise AssertionError(f"{label}: differs at flat index {worst}: got {got.flatten()[worst].item():.6g}, "
                             f"expected {expected.flatten()[worst].item():.6g} (atol {atol:g}, rtol {rtol:g})")
    tolerance = f"{atol:g}" + (f" + {rtol:g}·|expected|" if rtol else "")
    print(f"✓ {label}: equal within {tolerance}")
