"""ZeRO-1, 2 and 3 on the ring reduce-scatter and all-gather: the same parameters as DDP after AdamW steps, and the
state each rank holds cut as the stage says."""
import pytest
import torch

from moelab.collectives import ring_all_reduce
from moelab.config import ModelConfig
from moelab.dist import launch
from moelab.model import Transformer
from moelab.network import Network, Topology, chunk_sizes, ring_bytes
from moelab.presets import BALANCE
from moelab.sizing import zero_state_per_device
from moelab.zero import Zero

CONFIG = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32, n_routed_experts=4,
                     top_k=2, d_expert=32, **BALANCE)
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(100 * step + rank))


def loss(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    _, ce = model(idx, idx)
    return ce + model.aux_loss


def zero_rank(rank: int, world: int, stage: int, steps: int) -> dict:
    torch.manual_seed(0)
    model, ddp = Transformer(CONFIG), Transformer(CONFIG)
    ddp.load_state_dict(model.state_dict())
    zero = Zero(model, stage, **ADAMW)
    opt = torch.optim.AdamW(ddp.parameters(), **ADAMW)
    for step in range(steps):
        zero.step_begin()
        loss(model, batch(rank, step)).backward()
        zero.step()
        opt.zero_grad()
        loss(ddp, batch(rank, step)).backward()                  # DDP with the same ring: the same sums
        flat = torch.cat([p.grad.flatten() for p in ddp.parameters()])
        summed = ring_all_reduce(flat) / world
        offset = 0
        for p in ddp.parameters():
            p.grad.copy_(summed[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        opt.step()
    zero.step_begin()                                            # ZeRO-3: the whole parameters, to compare
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    expected = torch.cat([p.detach().flatten() for p in ddp.parameters()])
    return {"got": got, "expected": expected, "held": zero.held, "shard": zero.shard.numel(),
            "numel": expected.numel()}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_equals_ddp_after_adamw_steps_and_holds_its_share(stage):
    results = launch(zero_rank, 3, args=(stage, 3), timeout=120)
    n = results[0]["numel"]
    assert [r["shard"] for r in results] == chunk_sizes(n, 3)
    for r in results:
        torch.testing.assert_close(r["got"], r["expected"], rtol=0, atol=0)
        shard = r["shard"] * 4
        assert r["held"] == {"parameters": n * 4 if stage < 3 else shard,
                             "gradients": n * 4 if stage == 1 else shard, "optimizer": 2 * shard}
        formula = zero_state_per_device(n, 3, stage)
        for key, value in r["held"].items():
            assert value == pytest.approx(formula[key], rel=1e-3), key        # shards of N/3, rounded


def test_a_stage_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="stage = 4 is not allowed; allowed: 1, 2, 3"):
        Zero(torch.nn.Linear(2, 2), 4)


def fsdp_rank(rank: int, world: int, steps: int) -> torch.Tensor:
    """torch's FSDP2 (``fully_shard`` on each block and the model) on gloo, the same model, batches and AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Transformer(CONFIG)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    for step in range(steps):
        opt.zero_grad()
        loss(model, batch(rank, step)).backward()
        opt.step()
    return torch.cat([p.full_tensor().detach().flatten() for p in model.parameters()])


@pytest.mark.slow
def test_zero3_equals_torch_fsdp2():
    ours = launch(zero_rank, 3, args=(3, 3), timeout=120)
    theirs = launch(fsdp_rank, 3, args=(3,), timeout=120)
    for r, t in zip(ours, theirs):                       # gloo sums in another order than the ring
        torch.testing.assert_close(r["got"], t, rtol=1e-5, atol=1e-6)


def test_zero_state_formula_and_its_bad_input():
    assert zero_state_per_device(1e9, 8, 0) == {"parameters": 4e9, "gradients": 4e9, "optimizer": 8e9}
    assert zero_state_per_device(1e9, 8, 3, weights="bf16") == {"parameters": 2e9 / 8, "gradients": 2e9 / 8,
                                                                "optimizer": 12e9 / 8}
    with pytest.raises(ValueError, match="stage = 4 is not allowed; allowed: 0, 1, 2, 3"):
        zero_state_per_device(1e9, 8, 4)


def bytes_rank(rank: int, world: int, stage: int) -> int:
    net = Network(Topology(world, 1), virtual=True)            # one rank per node: every message on the slow link
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    zero = Zero(model, stage, net, **ADAMW)
    net.reset()
    zero.step_begin()
    loss(model, batch(rank, 0)).backward()
    zero.step()
    return sum(net.sent_bytes.values())


@pytest.mark.slow
def test_every_stage_sends_one_reduce_scatter_and_one_all_gather_per_step():
    """As many bytes as DDP's ring all-reduce (but for the all-gather's padded shards): ZeRO-3 gathers once before
    forward and keeps the parameters through backward (FSDP, freeing each layer after its forward, gathers again
    in backward: 1.5 times the bytes)."""
    n, p = sum(q.numel() for q in Transformer(CONFIG).parameters()), 3
    sent = {stage: launch(bytes_rank, p, args=(stage,), timeout=120) for stage in (1, 2, 3)}
    assert sent[1] == sent[2] == sent[3]
    for rank, b in enumerate(sent[1]):
        assert b == pytest.approx(ring_bytes(n, p, rank), rel=1e-3)
