"""The expert-parallel all-to-all on real gloo ranks: uneven splits, empty sends, and its gradient."""
import pytest
import torch

from moelab.dist import RankError, launch
from moelab.ep import all_to_all, exchange_counts


def rows_for(sender: int, receiver: int, world: int) -> int:
    """How many rows ``sender`` sends to ``receiver``: uneven, and rank 0 sends nothing to the last rank."""
    return 0 if (sender, receiver) == (0, world - 1) else sender + 2 * receiver + 1


def exchange_rank(rank, world_size):
    send = torch.tensor([rows_for(rank, j, world_size) for j in range(world_size)])
    recv = exchange_counts(send)
    # row i sent from rank r to rank j holds the value 1000·r + 10·j + i
    x = torch.cat([torch.tensor([1000.0 * rank + 10 * j + i for i in range(n)]) for j, n in enumerate(send.tolist())])
    x = x[:, None].repeat(1, 3).requires_grad_()
    y = all_to_all(x, send.tolist(), recv.tolist())
    (y * (y[:, :1] + 1)).sum().backward()          # Σ_c y_c·(y_0 + 1): d/dy_0 = 4·y_0 + 1, d/dy_1 = y_0 + 1
    return recv.tolist(), y.detach(), x.grad


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_moves_uneven_rows_and_its_gradient_comes_back(world):
    for rank, (recv, y, grad) in enumerate(launch(exchange_rank, world, timeout=60)):
        assert recv == [rows_for(j, rank, world) for j in range(world)]
        expected = torch.cat([torch.tensor([1000.0 * j + 10 * rank + i for i in range(rows_for(j, rank, world))])
                              for j in range(world)])
        torch.testing.assert_close(y[:, 0], expected)
        # each sent row's gradient, computed on the rank that received it and sent back (all 3 columns equal v)
        sent = torch.cat([torch.tensor([1000.0 * rank + 10 * j + i for i in range(rows_for(rank, j, world))])
                          for j in range(world)])
        torch.testing.assert_close(grad[:, 0], 4 * sent + 1)
        torch.testing.assert_close(grad[:, 1], sent + 1)


def bad_splits_rank(rank, world_size):
    all_to_all(torch.zeros(3, 2), [1, 1], [1, 1])


def test_splits_that_do_not_add_up_are_refused_on_the_rank():
    with pytest.raises(RankError, match="send_splits add up to 2 rows but x has 3; allowed: equal"):
        launch(bad_splits_rank, 2, timeout=60)
