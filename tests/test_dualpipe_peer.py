"""DualPipe 1.0.0's own order on each rank: every forward once, each backward after its forward, W after its B."""
import re

import dualpipe
import pytest

from moelab.experiments.dualpipe_peer import dualpipe_order

ACTION = re.compile(r"^([FBW])([01])\.(\d+)$")
SIZES = [(2, 4), (4, 8), (4, 10), (8, 16)]


def parse(order: list[str]) -> list[tuple[str, int, int]]:
    actions = []
    for action in order:
        match = ACTION.match(action)
        assert match, action
        actions.append((match[1], int(match[2]), int(match[3])))
    return actions


def test_the_order_comes_from_the_pinned_dualpipe():
    assert dualpipe.__version__ == "1.0.0"


@pytest.mark.parametrize("pp, m", SIZES)
def test_each_forward_once_then_its_backward_once_then_at_most_one_w(pp, m):
    orders = dualpipe_order(pp, m)
    assert len(orders) == pp
    everything = {(chunk, mb) for chunk in (0, 1) for mb in range(m // 2)}     # each chunk carries half of them
    for rank, order in enumerate(orders):
        actions = parse(order)
        position = {}
        for i, (kind, chunk, mb) in enumerate(actions):
            assert (kind, chunk, mb) not in position, f"rank {rank}: {kind}{chunk}.{mb} twice"
            position[kind, chunk, mb] = i
        done = {kind: {(c, mb) for k, c, mb in actions if k == kind} for kind in "FBW"}
        assert done["F"] == everything and done["B"] == everything, rank
        assert done["W"] <= done["B"]
        assert all(position["F", c, mb] < position["B", c, mb] for c, mb in everything)
        assert all(position["B", c, mb] < position["W", c, mb] for c, mb in done["W"])
        assert len(order) == 2 * m + len(done["W"])
        # W runs first in, first out of the deferred backwards, and the step ends with W's only
        deferred = [(c, mb) for kind, c, mb in actions if kind == "B" and (c, mb) in done["W"]]
        assert [(c, mb) for kind, c, mb in actions if kind == "W"] == deferred
        assert {kind for kind, _, _ in actions[-(min(rank, pp - 1 - rank) + 1):]} == {"W"}


@pytest.mark.parametrize("pp, m", SIZES)
def test_some_weight_gradients_are_deferred_and_some_folded_into_their_backward(pp, m):
    for order in dualpipe_order(pp, m):
        ws = sum(action.startswith("W") for action in order)
        assert 0 < ws < m


@pytest.mark.parametrize("pp, m", SIZES)
def test_rank_r_mirrors_rank_pp_minus_1_minus_r_with_the_chunks_swapped(pp, m):
    orders = dualpipe_order(pp, m)
    swap = str.maketrans("01", "10")
    for rank in range(pp):
        assert [a[0] + a[1].translate(swap) + a[2:] for a in orders[rank]] == orders[pp - 1 - rank]


def test_the_order_of_rank_0_for_4_ranks_and_8_micro_batches():
    # warm-up F0 ×3 and F1, one zero-bubble B1 W1, F&B pairs (F0 B1, F1 B0), the B1 B0 drain, W last
    assert dualpipe_order(4, 8)[0] == (
        "F0.0 F0.1 F0.2 F1.0 B1.0 W1.0 F1.1 F0.3 B1.1 F1.2 B0.0 B1.2 F1.3 B0.1 B1.3 B0.2 W0.2 B0.3 W0.3").split()


@pytest.mark.parametrize("pp, m, field", [(3, 12, "pp"), (0, 4, "pp"), (4, 6, "microbatches"),
                                          (4, 9, "microbatches"), (2.0, 4, "pp"), (2, "4", "microbatches")])
def test_bad_sizes_name_the_field(pp, m, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        dualpipe_order(pp, m)
