"""Plotting helpers the notebooks share: loss curves, attention maps, expert loads, routing pictures.

Each helper draws on a given ``matplotlib`` Axes (or a new one) and returns it, so notebooks can combine
them. Built in notebooks/01_dense_baseline.ipynb.

Shapes: ``E`` experts; ``T_query`` and ``T_key`` positions of an attention map.
"""
from __future__ import annotations

import html
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm

from .timeline import Event
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
    """Heatmap of one head's attention probabilities ``(T_query, T_key)``; rows are queries. The colour scale is
    0 to 1 for every head, so that several heads can share one colour bar."""
    ax = _axes(ax, (4.0, 4.0))
    ax.imshow(probs.detach().float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    if labels is not None:
        ticks = range(len(labels))
        ax.set_xticks(ticks, labels)
        ax.set_yticks(ticks, labels)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(title)
    return ax


def plot_expert_load(requested: torch.Tensor, kept: torch.Tensor | None = None, capacity: int | None = None,
                     ax: Axes | None = None, title: str = "") -> Axes:
    """Assignments per expert: what each expert was asked for, what it kept (capacity dispatch), its capacity."""
    ax = _axes(ax, (6.0, 3.0))
    experts = np.arange(len(requested))
    ax.bar(experts, requested.numpy(), color="tab:red", label="requested (red part: dropped)")
    if kept is not None:
        ax.bar(experts, kept.numpy(), color="tab:blue", label="kept")
    if capacity is not None:
        ax.axhline(capacity, color="black", ls="--", lw=1, label=f"capacity = {capacity}")
    ax.set(xlabel="expert", ylabel="assignments", title=title)
    ax.legend(fontsize=8)
    return ax


def plot_load_heatmap(counts: np.ndarray, ax: Axes | None = None, title: str = "",
                      steps: Sequence[int] | None = None, span: float = 1.0) -> Axes:
    """Each expert's share of the assignments over training, relative to a fair share: ``counts`` is
    ``(steps, E)``; 1 (white) is a perfectly balanced expert, red is overloaded, blue idle. The colours run from
    ``1 - span`` to ``1 + span``: a small ``span`` shows the small imbalances of a balanced run. ``steps``
    (equally spaced) labels the rows of ``counts`` with their training steps when they are not 0, 1, 2, …"""
    if not 0 < span <= 1:
        raise ValueError(f"span = {span!r} is not allowed; allowed: a number in (0, 1]")
    ax = _axes(ax, (6.0, 2.5))
    share = counts / counts.mean(axis=1, keepdims=True)
    extent = None
    if steps is not None:
        if len(steps) != len(counts) or len(steps) < 2:
            raise ValueError(f"steps has {len(steps)} entries; allowed: one per row of counts ({len(counts)}), "
                             f"at least 2")
        extent = (steps[0], steps[-1] + steps[1] - steps[0], counts.shape[1] - 0.5, -0.5)
    image = ax.imshow(share.T, aspect="auto", cmap="RdBu_r", vmin=1.0 - span, vmax=1.0 + span,
                      interpolation="nearest", extent=extent)
    ax.set(xlabel="training step", ylabel="expert", title=title)
    ax.figure.colorbar(image, ax=ax, label="load / fair share")
    return ax


def domain_preference(fractions: np.ndarray) -> np.ndarray:
    """``fractions[d, e] / mean_d fractions[d, e]``: how much more (> 1) or less (< 1) domain ``d`` sends to
    expert ``e`` than the domains do on average (1 where no domain uses the expert).

    Dividing by the expert's mean share takes out how popular the expert is overall, which would otherwise
    dominate the picture; what is left is specialisation, the quantity the mutual information sums up."""
    mean = fractions.mean(axis=0, keepdims=True)
    return np.divide(fractions, mean, out=np.ones_like(fractions, dtype=float), where=mean > 0)


def plot_domain_experts(fractions: np.ndarray, domains: Sequence[str], ax: Axes | None = None,
                        title: str = "", span: float | None = None) -> Axes:
    """Heatmap of :func:`domain_preference` of ``fractions`` ``(domains, experts)`` (each domain's share of its
    assignments per expert) on a log colour scale from ``1 / span`` (blue, avoided) through 1 (white) to ``span``
    (red, preferred); ``span`` defaults to the largest factor in the data, at least 2."""
    ax = _axes(ax, (7.0, 2.4))
    lift = domain_preference(fractions)
    if span is None:
        span = max(2.0, float(np.exp(np.abs(np.log(lift[lift > 0])).max())))
    if not span > 1:
        raise ValueError(f"span = {span!r} is not allowed; allowed: a number > 1")
    image = ax.imshow(np.clip(lift, 1 / span, span), aspect="auto", cmap="RdBu_r", interpolation="nearest",
                      norm=LogNorm(vmin=1 / span, vmax=span))
    ax.set_yticks(range(len(domains)), list(domains))
    ax.set(xlabel="expert", title=title)
    ticks = [2.0 ** p for p in range(-int(np.log2(span)), int(np.log2(span)) + 1)]
    bar = ax.figure.colorbar(image, ax=ax, label="share ÷ all domains' mean")
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    bar.minorticks_off()
    return ax


def expert_colors(n_experts: int) -> list[str]:
    """One distinguishable hex colour per expert (matplotlib's tab20, then tab20b and tab20c)."""
    palette = [c for name in ("tab20", "tab20b", "tab20c") for c in plt.get_cmap(name).colors]
    return ["#" + "".join(f"{round(255 * v):02x}" for v in palette[e % len(palette)][:3]) for e in range(n_experts)]


def color_by_expert(text: str, experts: Sequence[int], n_experts: int) -> str:
    """HTML for ``text`` with each character on the colour of its expert (newlines shown as ⏎)."""
    colors = expert_colors(n_experts)
    spans = "".join(
        f'<span title="expert {e}" style="background:{colors[e]};padding:1px 0">'
        f'{html.escape(ch) if ch != chr(10) else "⏎"}</span>' for ch, e in zip(text, experts))
    return f'<div style="font-family:monospace;font-size:14px;line-height:1.8">{spans}</div>'


PHASE_COLORS = {"route": "tab:purple", "dispatch": "tab:blue", "expert": "tab:green", "combine": "tab:orange",
                "combine backward": "navajowhite", "expert backward": "lightgreen", "dispatch backward": "lightblue",
                "all-reduce": "tab:red",
                # the rounds of moelab.collectives, by their first word ("reduce-scatter 2" → "reduce-scatter")
                "reduce-scatter": "tab:blue", "all-gather": "tab:orange", "halving": "tab:blue",
                "doubling": "tab:orange", "fold": "tab:gray", "tree": "tab:purple", "pairwise": "tab:green",
                "across": "tab:red", "inside": "tab:cyan"}


def plot_timeline(timelines: Sequence[Sequence[Event | dict]], ax: Axes | None = None, title: str = "") -> Axes:
    """One row per rank, one bar per phase (:class:`moelab.timeline.Event`, or its dict), in milliseconds since
    the ranks' common start — the view of a trace viewer. A phase is coloured by its name in
    :data:`PHASE_COLORS`, else by its first word (a collective's numbered rounds), else grey."""
    ax = _axes(ax, (8.0, 0.6 + 0.55 * len(timelines)))
    seen: dict[str, str] = {}
    for rank, events in enumerate(timelines):
        for e in events:
            e = e if isinstance(e, Event) else Event(**e)
            key = e.phase if e.phase in PHASE_COLORS else e.phase.split()[0]
            color = PHASE_COLORS.get(key, "grey")
            ax.broken_barh([(1e3 * e.start, 1e3 * e.seconds)], (rank - 0.4, 0.8), color=color, edgecolor="black",
                           linewidth=0.3, label=None if key in seen else key)
            seen[key] = color
    ax.set_yticks(range(len(timelines)), [f"rank {r}" for r in range(len(timelines))])
    ax.set_ylim(len(timelines) - 0.5, -0.5)
    ax.set(xlabel="time since the step started (ms)", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return ax


def plot_all_to_all(sent: Sequence[Sequence[int]], splits: Sequence[Sequence[int]], ax: Axes | None = None,
                    title: str = "") -> Axes:
    """An all-to-all drawn by hand: rank ``r``'s send buffer ``sent[r]`` (row labels) on the left, cut into
    ``splits[r][j]`` rows for rank ``j``; the receive buffers on the right, filled in rank order; an arrow per row,
    coloured by the receiving rank."""
    world = len(sent)
    ax = _axes(ax, (6.0, 1.0 + 1.1 * sum(len(s) for s in sent) / world))
    colors = [plt.get_cmap("tab10")(j) for j in range(world)]
    received: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]   # (label, from rank, row)
    height = max(len(s) for s in sent) + 1
    for r in range(world):
        row = 0
        for j, n in enumerate(splits[r]):
            for _ in range(n):
                received[j].append((sent[r][row], r, row))
                row += 1
    for r in range(world):
        top = r * height
        ax.text(-0.1, top - 0.9, f"rank {r} sends", fontsize=9, ha="center")
        ax.text(2.1, top - 0.9, f"rank {r} receives", fontsize=9, ha="center")
        row = 0
        for j, n in enumerate(splits[r]):
            for _ in range(n):
                ax.text(-0.1, top + row, str(sent[r][row]), ha="center", va="center", fontsize=9,
                        bbox=dict(boxstyle="square", fc=colors[j], alpha=0.35))
                row += 1
        # rows arrive grouped by sender, in rank order (what all_to_all_single returns)
        for i, (label, src, src_row) in enumerate(sorted(received[r], key=lambda t: t[1])):
            ax.text(2.1, top + i, str(label), ha="center", va="center", fontsize=9,
                    bbox=dict(boxstyle="square", fc=colors[r], alpha=0.35))
            ax.annotate("", xy=(1.85, top + i), xytext=(0.15, src * height + src_row),
                        arrowprops=dict(arrowstyle="->", color=colors[r], lw=1))
    ax.set_xlim(-0.6, 2.6)
    ax.set_ylim(world * height - 0.5, -1.5)
    ax.axis("off")
    ax.set_title(title)
    return ax
