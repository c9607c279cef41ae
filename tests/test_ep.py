"""The expert-parallel all-to-all on real gloo ranks: uneven splits, empty sends, and its gradient."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from moelab.dist import RankError, launch
from moelab.exchange import all_to_all, exchange_counts
from moelab.experiments.expert_parallel import equivalence_rank, layer_config, layer_rank, toy_rank

pytestmark = pytest.mark.slow            # spawns ranks, runs JupyterLab or installs: not in make test-fast


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
    for rank, (recv, y, grad) in enumerate(launch(exchange_rank, world, backend="gloo", timeout=60)):
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
        launch(bad_splits_rank, 2, backend="gloo", timeout=60)


@pytest.mark.parametrize("world, n_experts, skew", [(2, 4, 0.0), (4, 8, 0.0), (2, 4, 100.0)])
def test_expert_parallel_equals_one_process_in_outputs_and_all_gradients(world, n_experts, skew):
    cfg = layer_config(d_model=16, n_experts=n_experts, top_k=2, d_expert=8)
    for rank, checks in enumerate(launch(equivalence_rank, world, args=(cfg, 12, skew), backend="gloo", timeout=60)):
        received = checks.pop("received")
        assert (received == 0) == (skew > 0 and rank > 0)    # with the skew, rank 1 gets no rows at all
        for name, (got, expected) in checks.items():
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {name}: {m}")


def dp_ep_rank(rank, world_size, steps):
    """A small MoE LM trained `steps` steps by one process on all ranks' batches, then with data + expert
    parallelism and with data parallelism alone on this rank's batch; returns the final states of what this rank
    holds, each beside one process's."""
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
        ep.shard(moe)
    opt = train.make_optimizer(model, tcfg)
    shard = slice(2 * rank, 2 * rank + 2)
    for x, y in batches:
        train.train_step(model, opt, x[shard], y[shard], grad_clip=1.0)
    torch.manual_seed(0)
    replica = Transformer(cfg)                                   # data parallel only: every rank holds all experts
    opt = train.make_optimizer(replica, tcfg)
    for x, y in batches:
        train.train_step(replica, opt, x[shard], y[shard], grad_clip=1.0, data_parallel=True)
    E_local = cfg.n_routed_experts // world_size
    expected = {}
    for name, p in single.state_dict().items():
        expected[name] = p[rank * E_local:(rank + 1) * E_local] if ".experts." in name else p
    return {**{name: (p, expected[name]) for name, p in model.state_dict().items()},
            **{f"dp {name}": (p, single.state_dict()[name]) for name, p in replica.state_dict().items()}}


@pytest.mark.parametrize("world", [2, 4])
def test_data_and_expert_parallel_training_equals_one_process(world):
    for rank, state in enumerate(launch(dp_ep_rank, world, args=(3,), backend="gloo", timeout=120)):
        assert any(".experts." in name for name in state) and any("router.bias" in name for name in state)
        for name, (got, expected) in state.items():
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {rank} {name}: {m}")


def test_the_toy_all_to_all_delivers_each_token_to_its_experts_rank():
    results = launch(toy_rank, 2, backend="gloo", timeout=60)
    for rank, r in enumerate(results):
        # token t of rank s chose expert (t + s) % 4, held by rank ((t + s) % 4) // 2; rows arrive by sender
        expected = [10 * s + t for s in range(2) for t in sorted(range(4), key=lambda t: (t + s) % 4)
                    if ((t + s) % 4) // 2 == rank]
        assert r["received"] == expected
        assert r["recv"] == [results[s]["send"][rank] for s in range(2)]


@pytest.mark.parametrize("world, skew", [(2, 0.0), (4, 0.0), (2, 2.0)])
def test_timeline_counts_the_bytes_of_every_all_to_all_and_the_rows_of_every_expert(world, skew):
    cfg = layer_config(d_model=16, n_experts=8, top_k=2, d_expert=8)
    tokens, row_bytes = 24, 16 * 4                                   # fp32 rows of d_model values
    results = launch(layer_rank, world, args=(cfg, tokens, 1, 0, skew), backend="gloo", timeout=60)
    steps = [r["events"][0] for r in results]
    phases = [[e["phase"] for e in events] for events in steps]
    assert all(p == ["route", "dispatch", "expert", "combine", "combine backward", "expert backward",
                     "dispatch backward"] for p in phases)
    by_phase = [{e["phase"]: e for e in events} for events in steps]
    for rank, ev in enumerate(by_phase):
        d, c = ev["dispatch"], ev["combine"]
        # every (token, expert) pair leaves once as a row of d_model values: tokens·k·d_model·4 bytes each way
        assert d["sent"] + d["local"] == tokens * cfg.top_k * row_bytes
        assert (c["sent"], c["received"], c["local"]) == (d["received"], d["sent"], d["local"])
        assert (ev["combine backward"]["sent"], ev["dispatch backward"]["sent"]) == (d["sent"], d["received"])
        assert ev["expert"]["rows"] == ev["expert backward"]["rows"] == (d["received"] + d["local"]) // row_bytes
        assert all(e["start"] <= e["end"] for e in steps[rank])
        assert ev["dispatch"]["comm"] > 0 and ev["expert"]["comm"] == 0
    assert sum(ev["dispatch"]["sent"] for ev in by_phase) == sum(ev["dispatch"]["received"] for ev in by_phase)
    rows = [ev["expert"]["rows"] for ev in by_phase]
    assert sum(rows) == world * tokens * cfg.top_k
    if skew:
        assert rows[0] > 1.5 * max(rows[1:])                         # rank 0's experts get the extra load


def test_the_expert_parallel_layer_runs_under_torchrun_with_the_same_rank_function():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "moelab.dist", "moelab.experiments.expert_parallel:summary_rank", "64", "1"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("2 ranks × 64 tokens: ") and "dispatch payload 2048 B per token" in line  # k·d·4
    rows = json.loads(line.split("expert rows per rank ")[1])
    assert len(rows) == 2 and sum(rows) == 2 * 64 * 2


def half_sharded_step_rank(rank, world_size):
    from moelab import ep, train
    from moelab.config import ModelConfig
    from moelab.model import Transformer

    cfg = ModelConfig(vocab_size=8, block_size=4, n_layer=3, n_head=1, d_model=8, n_routed_experts=2, top_k=1,
                      first_k_dense=1)
    model = Transformer(cfg)
    ep.shard(model.moe_layers[1])
    opt = train.make_optimizer(model, train.TrainConfig())
    x = torch.zeros(1, 4, dtype=torch.long)
    train.train_step(model, opt, x, x, grad_clip=1.0)


def shard_twice_rank(rank, world_size):
    """Shard a layer, record one forward pass on a timeline set afterwards, then try to shard it again."""
    from moelab import ep
    from moelab.moe import MoE
    from moelab.timeline import Timeline

    moe = ep.shard(MoE(layer_config(d_model=16, n_experts=4, top_k=2, d_expert=8)))
    timeline = Timeline()
    moe.dispatcher.set_timeline(timeline)
    moe(torch.randn(3, 16))
    assert [e.phase for e in timeline.events] == ["route", "dispatch", "expert", "combine"]
    assert moe.experts.n_experts == 2 and moe.dispatcher.exchange.timeline is timeline
    ep.shard(moe)


def test_a_layer_is_sharded_once_and_its_dispatcher_takes_a_timeline_later():
    with pytest.raises(RankError, match="shard: this MoE layer is already expert-parallel; allowed: a layer "
                                        "holding all experts"):
        launch(shard_twice_rank, 2, backend="gloo", timeout=60)


def test_train_step_refuses_a_model_with_only_some_layers_expert_parallel():
    with pytest.raises(RankError, match=r"MoE layers \[1\] .* are expert-parallel and the others are not; "
                                        r"allowed: every MoE layer sharded with moelab.ep.shard, or none"):
        launch(half_sharded_step_rank, 2, backend="gloo", timeout=60)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_expert_parallel_equals_one_process_on_two_gpus_with_nccl():
    cfg = layer_config(d_model=16, n_experts=4, top_k=2, d_expert=8)
    for rank, checks in enumerate(launch(equivalence_rank, 2, args=(cfg, 12), backend="nccl", timeout=120)):
        checks.pop("received")
        for name, (got, expected) in checks.items():
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {rank} {name}: {m}")


def fp8_wire_rank(rank, world_size):
    """The EP layer with FP8 dispatch and BF16 combine against one process that rounds the same way."""
    from moelab import ep, quant
    from moelab.dispatch import assignments
    from moelab.moe import MoE
    from moelab.timeline import Timeline

    torch.manual_seed(0)
    cfg = layer_config(d_model=160, n_experts=4, top_k=2, d_expert=32)        # 160 = one full and one short tile
    moe = MoE(cfg)
    x_all = torch.randn(world_size * 10, 160) * torch.logspace(-2, 1, 160)
    with torch.no_grad():
        routing = moe.router(x_all)
        token, expert, weight = assignments(routing)
        rows = quant.dequantize(*quant.quantize(x_all[token], "fp8_e4m3", 128, pow2=True), 128)
        outs = torch.stack([moe.experts.expert(int(e), r[None])[0] for r, e in zip(rows, expert)])
        ref = torch.zeros_like(x_all).index_add_(0, token, outs.bfloat16().float() * weight[:, None])
    sharded = copy.deepcopy(moe)
    timeline = Timeline()
    ep.shard(sharded, wire="fp8", timeline=timeline)
    x = x_all[rank * 10:(rank + 1) * 10].clone().requires_grad_()
    y = sharded(x)
    y.sum().backward()                                       # the gradient travels back in bf16
    events = {e.phase: e for e in timeline.events}
    return y.detach(), ref[rank * 10:(rank + 1) * 10], events, x.grad


def test_fp8_dispatch_and_bf16_combine_send_the_expected_bytes_and_round_as_one_process_would():
    for y, ref, events, grad in launch(fp8_wire_rank, 2, backend="gloo", timeout=60):
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)      # FP8 itself errs ~1e-2: this is tight
        d, c = events["dispatch"], events["combine"]
        assert d.sent + d.local == 10 * 2 * (160 + 4 * 2)           # FP8 values + two fp32 scales per row
        assert c.sent + c.local == (d.received + d.local) // (160 + 8) * 160 * 2     # bf16 rows back
        back = events["dispatch backward"]                         # the gradients of this rank's rows, in bf16
        assert back.received + back.local == 10 * 2 * 160 * 2
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="wire.name = 'int4' is not allowed; allowed: fp32, fp8"):
        from moelab.exchange import Exchange
        Exchange(wire="int4")
