"""Plot helpers draw what they are given (checked on the Agg backend, no display needed)."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moelab.train import History  # noqa: E402
from moelab.viz import (  # noqa: E402
    color_by_expert,
    domain_preference,
    ema,
    expert_colors,
    plot_attention,
    plot_domain_experts,
    plot_expert_load,
    plot_history,
    plot_load_heatmap,
)


def test_ema_starts_at_the_first_value_and_smooths():
    assert ema([2.0, 4.0, 4.0], alpha=0.5).tolist() == [2.0, 3.0, 3.5]


def test_plot_history_draws_steps_or_tokens():
    h = History(step=[0, 1, 2], loss=[3.0, 2.0, 1.0], lr=[1, 1, 1], eval_step=[0, 2], eval_train=[3.0, 1.2],
                eval_val=[3.1, 1.5], tokens_per_step=100)
    ax = plot_history(h, label="dense")
    raw, smooth, val = ax.lines
    assert raw.get_ydata().tolist() == [3.0, 2.0, 1.0] and val.get_ydata().tolist() == [3.1, 1.5]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dense train (per step, smoothed)", "dense val"]
    ax = plot_history(h, x="tokens")
    assert ax.lines[2].get_xdata().tolist() == [0, 200] and ax.get_xlabel() == "tokens seen"


def test_plot_attention_shows_the_matrix_with_labels():
    probs = torch.tril(torch.ones(3, 3)) / torch.arange(1, 4)[:, None]
    ax = plot_attention(probs, labels=["a", "b", "c"], title="head 0")
    np.testing.assert_allclose(ax.images[0].get_array(), probs.numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"] and ax.get_title() == "head 0"


def test_plot_history_rejects_an_unknown_axis():
    with pytest.raises(ValueError, match="x = 'flops' is not allowed; allowed: 'step', 'tokens'"):
        plot_history(History(), x="flops")


def test_plot_expert_load_draws_requested_kept_and_capacity():
    ax = plot_expert_load(torch.tensor([5, 1, 0]), torch.tensor([3, 1, 0]), capacity=3)
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == [5, 1, 0, 3, 1, 0] and ax.lines[0].get_ydata()[0] == 3


def test_plot_load_heatmap_shows_shares_of_a_fair_load():
    ax = plot_load_heatmap(np.array([[2, 2, 4], [0, 4, 4]]))
    np.testing.assert_allclose(ax.images[0].get_array(), np.array([[0.75, 0.0], [0.75, 1.5], [1.5, 1.5]]))


def test_plot_load_heatmap_narrows_its_colour_scale_with_span():
    assert plot_load_heatmap(np.array([[2, 2, 4]]), span=0.5).images[0].get_clim() == (0.5, 1.5)
    with pytest.raises(ValueError, match="span = 0 is not allowed; allowed: a number in"):
        plot_load_heatmap(np.ones((2, 2)), span=0)


def test_plot_load_heatmap_labels_logged_steps_and_rejects_a_mismatch():
    ax = plot_load_heatmap(np.ones((3, 2)), steps=[0, 10, 20])
    assert ax.images[0].get_extent()[:2] == [0, 30]
    with pytest.raises(ValueError, match="steps has 2 entries; allowed: one per row of counts"):
        plot_load_heatmap(np.ones((3, 2)), steps=[0, 10])


def test_domain_preference_divides_by_the_experts_mean_share_and_leaves_unused_experts_at_one():
    fractions = np.array([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]])
    np.testing.assert_allclose(domain_preference(fractions), [[5 / 7, 5 / 3, 1.0], [9 / 7, 1 / 3, 1.0]])


def test_plot_domain_experts_draws_preferences_on_a_log_scale_shared_through_span():
    fractions = np.array([[0.5, 0.5], [1.0, 0.0]])
    ax = plot_domain_experts(fractions, ["a", "b"], span=4.0)
    np.testing.assert_allclose(ax.images[0].get_array(), [[2 / 3, 2.0], [4 / 3, 0.25]])      # 0 clipped to 1/4
    assert ax.images[0].get_clim() == (0.25, 4.0) and [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert plot_domain_experts(fractions, ["a", "b"]).images[0].get_clim() == (0.5, 2.0)     # at least 2
    with pytest.raises(ValueError, match="span = 1.0 is not allowed; allowed: a number > 1"):
        plot_domain_experts(fractions, ["a", "b"], span=1.0)


def test_color_by_expert_colours_each_character_and_escapes_html():
    colors = expert_colors(45)
    assert len(set(colors)) == 45 and all(c.startswith("#") and len(c) == 7 for c in colors)
    page = color_by_expert("<a\n", [0, 1, 2], 3)
    assert page.count("<span") == 3 and "&lt;" in page and "⏎" in page
    assert f'title="expert 1" style="background:{colors[1]}' in page


def test_plot_timeline_draws_one_row_per_rank_and_one_bar_per_phase():
    from moelab.timeline import Event
    from moelab.viz import plot_timeline

    ranks = [[Event("dispatch", 0.0, 0.002), Event("expert", 0.002, 0.010)],
             [{"phase": "dispatch", "start": 0.0, "end": 0.001, "sent": 0, "received": 0, "local": 0, "rows": 0,
               "comm": 0.0}, {"phase": "custom", "start": 0.001, "end": 0.003}]]
    ax = plot_timeline(ranks, title="t")
    bars = ax.collections
    assert len(bars) == 4
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dispatch", "expert", "custom"]
    x, width = bars[1].get_paths()[0].vertices[[0, 2], 0]
    assert abs(x - 2.0) < 1e-9 and abs(width - 10.0) < 1e-9        # milliseconds


def test_plot_all_to_all_sends_each_row_to_its_rank_in_sender_order():
    from moelab.viz import plot_all_to_all

    ax = plot_all_to_all([["a", "b", "c"], ["d", "e"]], [[1, 2], [1, 1]])
    arrows = [t for t in ax.texts if type(t).__name__ == "Annotation"]
    labels = [t.get_text() for t in ax.texts if t not in arrows and not t.get_text().startswith("rank")]
    # senders' rows, then receivers' rows: rank 0 gets a (from 0) and d (from 1); rank 1 gets b, c, e
    assert labels == ["a", "b", "c", "a", "d", "d", "e", "b", "c", "e"]
    assert len(arrows) == 5
