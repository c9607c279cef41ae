"""Two micro-batches through an expert-parallel block, one's all-to-all in flight while the other computes: the
same outputs and gradients as the block's own forward and backward, and less time on an emulated network."""
import pytest
import torch
import torch.distributed as dist

from moelab import overlap
from moelab.config import ModelConfig
from moelab.dist import launch
from moelab.ep import shard
from moelab.model import Block, Transformer
from moelab.network import Network, Topology
from moelab.presets import BALANCE
from moelab.rounds import post


def small_config(layers: int = 1) -> ModelConfig:
    return ModelConfig(vocab_size=50, block_size=16, n_layer=layers, n_head=4, n_kv_head=2, d_model=32,
                       n_routed_experts=8, top_k=2, d_expert=32, n_shared_experts=1, **BALANCE)


def block_rank(rank: int, world: int, config: ModelConfig, microbatches: int, order: str) -> dict:
    """On every rank: the same blocks, sharded; this rank's batch in ``microbatches``. Returns the outputs and the
    gradients of the input and of every parameter, through the blocks' own forward and through the pieces."""
    torch.manual_seed(0)
    model = Transformer(config)
    blocks: list[Block] = list(model.layers)
    for block in blocks:
        shard(block.ffn)
    g = torch.Generator().manual_seed(rank + 1)
    x = torch.randn(4, config.block_size, config.d_model, generator=g)
    grad_y = torch.randn(x.shape, generator=g)
    out = {}
    xs, gs = list(x.chunk(microbatches)), list(grad_y.chunk(microbatches))
    ys, x_grads = [], []
    for xm, gm in zip(xs, gs):                           # the blocks as they are: forward, then backward
        xm = xm.clone().requires_grad_()
        y = xm
        for block in blocks:
            y = block(y, model.rope_cos, model.rope_sin)
        torch.autograd.backward([y] + [b.ffn.aux_loss for b in blocks], [gm] + [torch.ones(())] * len(blocks))
        ys.append(y.detach())
        x_grads.append(xm.grad)
    out["reference"] = (ys, x_grads, {n: p.grad.clone() for n, p in model.layers.named_parameters()})
    model.zero_grad()
    pieces = [overlap.OverlappedBlock(b, model.rope_cos, model.rope_sin) for b in blocks]
    ys, x_grads, times = overlap.block_step(pieces if len(pieces) > 1 else pieces[0], xs, gs, order)
    out["pieces"] = (ys, x_grads, {n: p.grad.clone() for n, p in model.layers.named_parameters()})
    out["order"] = [name for name, _, _ in times.compute]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layers, microbatches, order", [(1, 1, "in turn"), (1, 2, "overlapped"), (1, 2, "in turn"),
                                                          (2, 2, "overlapped"), (2, 1, "in turn"),
                                                          (2, 3, "F&B pairs"), (1, 2, "F&B pairs")])
def test_the_pieces_equal_the_blocks(layers, microbatches, order):
    results = launch(block_rank, 4, args=(small_config(layers), microbatches, order), timeout=120)
    for r, result in enumerate(results):
        (ys, xg, pg), (ys2, xg2, pg2) = result["reference"], result["pieces"]
        for a, b in zip(ys + xg, ys2 + xg2):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert set(pg) == set(pg2)
        for n in pg:
            torch.testing.assert_close(pg2[n], pg[n], rtol=1e-4, atol=1e-6, msg=f"rank {r}: {n}")
    if (layers, microbatches, order) == (2, 2, "overlapped"):     # across blocks: output and attention fused
        assert results[0]["order"][:6] == ["attention 0 0", "attention 0 1", "experts 0 0", "experts 0 1",
                                           "attention 1 0", "attention 1 1"]
    if (layers, microbatches, order) == (1, 2, "F&B pairs"):       # B's forward pieces with A's backward pieces
        assert results[0]["order"] == ["attention 0", "experts 0", "output 0", "attention 1", "output backward 0",
                                       "experts 1", "experts backward 0", "output 1", "attention backward 0",
                                       "output backward 1", "experts backward 1", "attention backward 1"]


def test_bad_input_names_the_field():
    block = object.__new__(overlap.OverlappedBlock)
    with pytest.raises(ValueError, match="2 micro-batches, 1 gradients and 1 blocks"):
        overlap.block_step(block, [torch.zeros(1)] * 2, [torch.zeros(1)])
    with pytest.raises(ValueError, match="order = 'dualpipe' is not allowed; allowed: 'in turn', 'overlapped'"):
        overlap.block_step(block, [torch.zeros(1)], [torch.zeros(1)], "dualpipe")


def rounds_rank(rank: int, world: int) -> dict:
    """Rounds of 1 MB to the other node (0.105 s each on the 10 MB/s link) posted on a virtual network."""
    net = Network(Topology(2, 1), virtual=True)
    peer = 1 - rank
    x, out = torch.ones(250_000), torch.empty(250_000)
    dist.barrier()
    net.reset()

    def busy(seconds: float) -> None:
        t, start = torch.randn(100, 100), net.now()
        while net.now() - start < seconds:
            t = t @ t / t.norm()

    times = {}
    start = net.now()
    r = post([(peer, x)], [(peer, out)], net)
    busy(0.2)
    r.wait()                                              # in flight while the rank computed: hidden
    times["hidden"] = net.now() - start
    start = net.now()
    r = post([(peer, x)], [(peer, out)], net)
    r.wait()                                              # waited for at once: its whole time
    times["waited"] = net.now() - start
    start = net.now()
    first, second = post([(peer, x)], [(peer, out)], net), post([(peer, x)], [(peer, out)], net)
    first.wait()
    second.wait()                                         # queued behind the first on the link
    times["queued"] = net.now() - start
    times["ends"] = (first.end - start, second.end - start)
    return times


@pytest.mark.slow
def test_a_posted_round_runs_while_the_rank_computes_and_queues_behind_the_one_before():
    one = 5e-3 + 1e6 / 10e6
    for t in launch(rounds_rank, 2, timeout=60):
        assert 0.2 <= t["hidden"] < 0.2 + 0.03
        assert t["waited"] == pytest.approx(one, abs=0.03)        # + the rank's own time, tens of ms when busy
        assert t["queued"] == pytest.approx(2 * one, abs=0.03)
        assert t["ends"][1] - t["ends"][0] == pytest.approx(one, abs=1e-6)
