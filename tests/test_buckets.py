"""Gradient buckets all-reduced from backward hooks: the same averaged gradients as one all-reduce after backward
and as torch's DDP, and on an emulated network a bucket's all-reduce runs while backward computes."""
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from moelab.buckets import BucketedAllReduce
from moelab.config import ModelConfig
from moelab.dist import launch
from moelab.model import Transformer
from moelab.network import Network, Topology


def small_config() -> ModelConfig:
    return ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64)


def grads_rank(rank: int, world: int, how: str) -> dict:
    torch.manual_seed(0)
    model = Transformer(small_config())
    g = torch.Generator().manual_seed(rank + 1)
    idx = torch.randint(50, (4, 16), generator=g)
    if how == "ddp":
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.01)
        ddp(idx, idx)[1].backward()
    else:
        buckets = None if how == "after" else BucketedAllReduce(model.parameters(), 20_000, overlap=how == "hooks")
        model(idx, idx)[1].backward()
        if buckets is None:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        else:
            assert len(buckets.buckets) > 3
            buckets.finish()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.slow
def test_buckets_average_the_gradients_as_ddp_and_one_all_reduce():
    reference = launch(grads_rank, 2, args=("after",), timeout=60)
    for how in ("hooks", "no overlap", "ddp"):
        for r, got in enumerate(launch(grads_rank, 2, args=(how,), timeout=60)):
            for n, g in reference[r].items():
                torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7, msg=f"{how}, rank {r}: {n}")


def bucket_times_rank(rank: int, world: int, overlap: bool) -> dict:
    """A bucket's gradient ready, 0.2 s of computation, then the wait: on the emulated network an all-reduce
    launched from the hook ran meanwhile, so the step lasts the longer of the two; one launched after the
    computation adds its time."""
    w = torch.nn.Parameter(torch.ones(250_000))           # 1 MB: 0.1 s on a 10 MB/s ring of 2
    net = Network(Topology(2, 1), virtual=True)
    buckets = BucketedAllReduce([w], 2_000_000, net, overlap=overlap)
    dist.barrier()
    net.reset()
    start = net.now()
    (w * rank).sum().backward()                           # the hook launches the bucket
    launched = net.now() - start
    t = torch.randn(100, 100)
    while net.now() - start < 0.2:                        # computation while the bucket travels
        t = t @ t / t.norm()
    buckets.finish()
    return {"launched": launched, "step": net.now() - start, "grad": w.grad[0].item(),
            "seconds": buckets.launched[0][2]}


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [True, False])
def test_a_bucket_in_flight_costs_only_what_is_left_of_it(overlap):
    for r in launch(bucket_times_rank, 2, args=(overlap,), timeout=60):
        assert r["grad"] == 0.5                            # (0 + 1) / 2
        assert r["seconds"] == pytest.approx(2 * (5e-3 + 500_000 / 10e6))
        assert r["launched"] < 0.05
        hidden = 0.0 if overlap else r["seconds"]          # the 0.11 s all-reduce behind 0.2 s of work, or after it
        assert 0.2 + hidden <= r["step"] < 0.2 + hidden + 0.05
