"""The expert-parallel all-to-all on real gloo ranks: uneven splits, empty sends, and its gradient."""
import copy

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


def ep_rank(rank, world_size, n_experts, skew):
    """Each rank: the same MoE as one process (same seed), its shard of the experts and of the tokens."""
    from moelab.config import ModelConfig
    from moelab.moe import MoE

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, d_model=16, n_routed_experts=n_experts,
                      top_k=2, d_expert=8, router="sigmoid")
    moe = MoE(cfg)
    if skew:                              # every token picks experts 0 and 1: the other ranks receive nothing
        moe.router.bias[:2] = 100.0
    x_all = torch.randn(world_size * 12, 16)
    g_all = torch.randn_like(x_all)
    # one process, all tokens, all experts
    x_ref = x_all.clone().requires_grad_()
    y_ref = moe(x_ref)
    (y_ref * g_all).sum().backward()
    ref = {"y": y_ref.detach(), "x_grad": x_ref.grad, "router": moe.router.weight.grad.clone(),
           **{n: p.grad.clone() for n, p in moe.experts.named_parameters()}}
    moe.zero_grad()
    # expert parallel: this rank's 12 tokens, its n_experts / world_size experts
    E_local = n_experts // world_size
    sharded = copy.deepcopy(moe)
    sharded.shard_experts()
    shard = slice(rank * 12, (rank + 1) * 12)
    x = x_all[shard].clone().requires_grad_()
    y = sharded(x)
    (y * g_all[shard]).sum().backward()
    router_grad = sharded.router.weight.grad.clone()
    torch.distributed.all_reduce(router_grad)       # the router is replicated: its gradient is summed over ranks
    local = sharded.experts
    return {"y": (y.detach(), ref["y"][shard]), "x_grad": (x.grad, ref["x_grad"][shard]),
            "router": (router_grad, ref["router"]),
            **{n: (p.grad, ref[n][rank * E_local:(rank + 1) * E_local]) for n, p in local.named_parameters()},
            "received": int(((moe.router(x_all).indices // E_local) == rank).sum())}


@pytest.mark.parametrize("world, n_experts, skew", [(2, 4, False), (4, 8, False), (2, 4, True)])
def test_expert_parallel_equals_one_process_in_outputs_and_all_gradients(world, n_experts, skew):
    for rank, checks in enumerate(launch(ep_rank, world, args=(n_experts, skew), timeout=60)):
        received = checks.pop("received")
        assert (received == 0) == (skew and rank > 0)       # with the skew, rank 1 gets no rows at all
        for name, (got, expected) in checks.items():
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {name}: {m}")


def dp_ep_rank(rank, world_size, steps):
    """A small MoE LM trained `steps` steps by one process on all ranks' batches, then with data + expert
    parallelism on this rank's batch; returns both final states of what this rank holds."""
    from moelab import ep, train
    from moelab.config import ModelConfig
    from moelab.model import Transformer

    cfg = ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=16, n_routed_experts=4, top_k=2,
                      d_expert=8, n_shared_experts=1, router="sigmoid", bias_update_speed=0.01, seq_aux_coef=1e-2)
    tcfg = train.TrainConfig(max_steps=steps, batch_size=2, lr=1e-2, warmup_steps=0)
    torch.manual_seed(1)
    batches = [(torch.randint(0, 32, (2 * world_size, 16)), torch.randint(0, 32, (2 * world_size, 16)))
               for _ in range(steps)]
    torch.manual_seed(0)
    single = Transformer(cfg)
    opt = train.make_optimizer(single, tcfg)
    for x, y in batches:
        train.train_step(single, opt, x, y, grad_clip=1.0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for moe in model.moe_layers:
        moe.shard_experts()
    opt = train.make_optimizer(model, tcfg)
    shard = slice(2 * rank, 2 * rank + 2)
    for x, y in batches:
        ep.train_step(model, opt, x[shard], y[shard], grad_clip=1.0)
    E_local = cfg.n_routed_experts // world_size
    expected = {}
    for name, p in single.state_dict().items():
        expected[name] = p[rank * E_local:(rank + 1) * E_local] if ".experts." in name else p
    return {name: (p, expected[name]) for name, p in model.state_dict().items()}


@pytest.mark.parametrize("world", [2, 4])
def test_data_and_expert_parallel_training_equals_one_process(world):
    for rank, state in enumerate(launch(dp_ep_rank, world, args=(3,), timeout=120)):
        assert any(".experts." in name for name in state) and any("router.bias" in name for name in state)
        for name, (got, expected) in state.items():
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {rank} {name}: {m}")
