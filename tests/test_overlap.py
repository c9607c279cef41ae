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


def small_config() -> ModelConfig:
    return ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=4, n_kv_head=2, d_model=32,
                       n_routed_experts=8, top_k=2, d_expert=32, n_shared_experts=1, **BALANCE)


def block_rank(rank: int, world: int, config: ModelConfig, microbatches: int, overlapped: bool) -> dict:
    """On every rank: the same block, sharded; this rank's batch in ``microbatches``. Returns the outputs and the
    gradients of the input and of every parameter, through the block's own forward and through the pieces."""
    torch.manual_seed(0)
    model = Transformer(config)
    block: Block = model.layers[0]
    shard(block.ffn)
    g = torch.Generator().manual_seed(rank + 1)
    x = torch.randn(4, config.block_size, config.d_model, generator=g)
    grad_y = torch.randn(x.shape, generator=g)
    out = {}
    xs, gs = list(x.chunk(microbatches)), list(grad_y.chunk(microbatches))
    ys, x_grads = [], []
    for xm, gm in zip(xs, gs):                           # the block as it is: forward, then backward
        xm = xm.clone().requires_grad_()
        y = block(xm, model.rope_cos, model.rope_sin)
        torch.autograd.backward([y, block.ffn.aux_loss], [gm, torch.ones(())])
        ys.append(y.detach())
        x_grads.append(xm.grad)
    out["reference"] = (ys, x_grads, {n: p.grad.clone() for n, p in block.named_parameters()})
    block.zero_grad()
    ob = overlap.OverlappedBlock(block, model.rope_cos, model.rope_sin)
    ys, x_grads, times = overlap.block_step(ob, xs, gs, overlap=overlapped)
    out["pieces"] = (ys, x_grads, {n: p.grad.clone() for n, p in block.named_parameters()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("microbatches, overlapped", [(1, False), (2, True), (2, False)])
def test_the_pieces_equal_the_block(microbatches, overlapped):
    for r, result in enumerate(launch(block_rank, 4, args=(small_config(), microbatches, overlapped), timeout=120)):
        (ys, xg, pg), (ys2, xg2, pg2) = result["reference"], result["pieces"]
        for a, b in zip(ys + xg, ys2 + xg2):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert set(pg) == set(pg2)
        for n in pg:
            torch.testing.assert_close(pg2[n], pg[n], rtol=1e-4, atol=1e-6, msg=f"rank {r}: {n}")


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
        assert t["waited"] == pytest.approx(one, abs=0.01)
        assert t["queued"] == pytest.approx(2 * one, abs=0.01)
        assert t["ends"][1] - t["ends"][0] == pytest.approx(one, abs=1e-6)
