"""Plot helpers draw what they are given (checked on the Agg backend, no display needed)."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moelab.train import History  # noqa: E402
from moelab.viz import ema, plot_attention, plot_expert_load, plot_history, plot_load_heatmap  # noqa: E402


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
