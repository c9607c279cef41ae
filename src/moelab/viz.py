"""Plotting helpers the notebooks share: loss curves and attention maps.

Each helper draws on a given ``matplotlib`` Axes (or a new one) and returns it, so notebooks can combine
them. Built in notebooks/01_dense_baseline.ipynb.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes

from .train import History


def _axes(ax: Axes | None, figsize: tuple[float, float] = (6.0, 3.5)) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=figsize, layout="constrained")[1]


def ema(values: Sequence[float], alpha: float = 0.1) -> np.ndarray:
    """Exponential moving average ``s_t = (1 - alpha) s_{t-1} + alpha x_t``, started at ``x_0``."""
    out = np.empty(len(values))
    for i, v in enumerate(values):
        out[i] = v if i == 0 else (1 - alpha) * out[i - 1] + alpha * v
    return out


def plot_history(history: History, ax: Axes | None = None, label: str = "", x: str = "step") -> Axes:
    """Training loss per step (faint, and smoothed) and the periodic validation loss (dots).

    ``x = "tokens"`` puts tokens seen on the horizontal axis instead of optimizer steps.
    """
    if x not in ("step", "tokens"):
        raise ValueError(f"x = {x!r} is not allowed; allowed: 'step', 'tokens'")
    ax = _axes(ax)
    scale = history.tokens_per_step if x == "tokens" else 1
    steps = np.asarray(history.step) * scale
    name = f"{label} " if label else ""
    line, = ax.plot(steps, history.loss, alpha=0.25, lw=0.8)
    ax.plot(steps, ema(history.loss), color=line.get_color(), lw=1.2, label=f"{name}train (per step, smoothed)")
    ax.plot(np.asarray(history.eval_step) * scale, history.eval_val, "o--", color=line.get_color(),
            ms=4, label=f"{name}val")
    ax.set_xlabel("tokens seen" if x == "tokens" else "optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_attention(probs: torch.Tensor, labels: Sequence[str] | None = None, ax: Axes | None = None,
                   title: str = "") -> Axes:
    """Heatmap of one head's attention probabilities ``(T_query, T_key)``; rows are queries."""
    ax = _axes(ax, (4.0, 4.0))
    ax.imshow(probs.detach().float().numpy(), cmap="viridis", vmin=0.0)
    if labels is not None:
        ticks = range(len(labels))
        ax.set_xticks(ticks, labels)
        ax.set_yticks(ticks, labels)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(title)
    return ax

