"""The checks of notebook 06's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import math

import pytest
import torch
import torch.distributed as dist
from solutions import load

from moelab import exercises
from moelab.exercises import ranks

NS = load("06_collectives.ipynb")
SLOW_24 = "on input 1 of 11 (nbytes=1000000, p=24, link=Link(name='slow', alpha=0.005, beta=10000000.0))"


def test_the_published_solutions_pass():
    assert exercises.check_all_reduce_times(NS["all_reduce_times"])
    assert exercises.check_hierarchical_time(NS["hierarchical_time"])
    assert exercises.check_wire_ratio(NS["wire_ratio"])


def test_halving_doubling_without_the_fold_fails_with_a_hint():
    def no_fold(nbytes, p, link):
        ring, _ = NS["all_reduce_times"](nbytes, p, link)
        return ring, 2 * math.ceil(math.log2(p)) * link.alpha + 2 * (p - 1) / p * nbytes / link.beta

    verdict = exercises.check_all_reduce_times(no_fold)
    assert repr(verdict).startswith(f"✗ check_all_reduce_times: {SLOW_24} the result[1] is 0.241667, "
                                    "expected 0.4375.")
    assert "halving-doubling first folds the extra ranks" in repr(verdict)


def test_ring_as_a_reduce_scatter_alone_fails_with_a_hint():
    def half_ring(nbytes, p, link):
        _, halving_doubling = NS["all_reduce_times"](nbytes, p, link)
        return (p - 1) * (link.alpha + nbytes / p / link.beta), halving_doubling

    verdict = exercises.check_all_reduce_times(half_ring)
    assert repr(verdict).startswith(f"✗ check_all_reduce_times: {SLOW_24} the result[0] is 0.210833, "
                                    "expected 0.421667.")
    assert "reduce-scatter and then an all-gather: 2(p−1) rounds" in repr(verdict)


def shifted_ring(shift, split):
    """A ring reduce-scatter that ends on chunk rank + shift, with chunks cut by ``split``."""
    def ring_reduce_scatter(x):
        rank, p = dist.get_rank(), dist.get_world_size()
        chunks = list(split(x.clone(), p))
        chunks += [x[:0].clone()] * (p - len(chunks))
        for s in range(p - 1):
            incoming = torch.empty_like(chunks[(rank - s - 2 + shift) % p])
            NS["swap"](chunks[(rank - s - 1 + shift) % p].contiguous(), (rank + 1) % p, incoming, (rank - 1) % p)
            chunks[(rank - s - 2 + shift) % p] += incoming
        return chunks[(rank + shift) % p]
    return ring_reduce_scatter


@pytest.mark.slow
def test_the_published_rank_code_passes():
    assert exercises.check_ring_reduce_scatter(NS["ring_reduce_scatter"])


@pytest.mark.slow
def test_rank_code_with_the_wrong_chunk_or_torch_chunk_fails_naming_the_input_and_the_rank():
    verdict = exercises.check_ring_reduce_scatter(shifted_ring(1, torch.tensor_split))
    assert repr(verdict).startswith("✗ check_ring_reduce_scatter: on input 1 of 6 (2 ranks, x of 10 values) rank 0: "
                                    "the result[0] is ")
    assert repr(verdict).endswith("Hint: rank r must end with chunk r: in round s, send chunk r − s − 1 and add what "
                                  "arrives into chunk r − s − 2.")
    verdict = exercises.check_ring_reduce_scatter(shifted_ring(0, lambda t, p: t.chunk(p)))
    assert repr(verdict).startswith("✗ check_ring_reduce_scatter: on input 5 of 6 (4 ranks, x of 10 values) rank 2: "
                                    "the result has shape (3,), expected (2,). Hint: cut with torch.tensor_split")


def one_rank_fails(x):
    if dist.get_rank() == 1 and len(x) == 1001:
        raise ValueError("chunk too long")
    return NS["ring_reduce_scatter"](x)


def one_rank_waits(x):
    if dist.get_rank() == 0:
        dist.barrier()                      # the others never come
    return NS["ring_reduce_scatter"](x)


@pytest.mark.slow
def test_rank_code_that_raises_or_hangs_is_a_verdict_and_a_stub_is_not_judged(monkeypatch):
    assert repr(exercises.check_ring_reduce_scatter(one_rank_fails)) == (
        "✗ check_ring_reduce_scatter: on input 3 of 6 (3 ranks, x of 1001 values) rank 1: your function raised "
        "ValueError: chunk too long")
    monkeypatch.setattr(ranks, "TIMEOUT_S", 5.0)
    assert repr(exercises.check_ring_reduce_scatter(one_rank_waits)) == (
        "✗ check_ring_reduce_scatter: on 2 ranks, the ranks did not finish within 5 s: a collective that not every "
        "rank calls, or a send without its receive?")
    monkeypatch.undo()                      # the stub's ranks get the usual time to start, however busy the machine
    with pytest.raises(NotImplementedError, match="exercise 06.2: write ring_reduce_scatter"):
        exercises.check_ring_reduce_scatter(NS_STUB)


def NS_STUB(x):  # noqa: N802 — the stub as the exercise notebook has it
    raise NotImplementedError("exercise 06.2: write ring_reduce_scatter")


def test_the_whole_buffer_across_the_nodes_fails_with_a_hint():
    def whole_buffer(nbytes, topology, intra, inter):
        G, N = topology.per_node, topology.nodes
        return (2 * (G - 1) * (intra.alpha + nbytes / G / intra.beta)
                + 2 * (N - 1) * (inter.alpha + nbytes / N / inter.beta))

    verdict = exercises.check_hierarchical_time(whole_buffer)
    assert repr(verdict).startswith("✗ check_hierarchical_time: on input 1 of 10 (nbytes=1048576, "
                                    "topology=Topology(nodes=2, per_node=2), intra=Link(name='fast'")
    assert "the result is 0.127343, expected 0.0749146. Hint: across the nodes each rank" in repr(verdict)


def test_a_flat_ring_on_the_slow_links_fails_with_a_hint():
    def flat(nbytes, topology, intra, inter):
        p = topology.nodes * topology.per_node
        return 2 * (p - 1) * (inter.alpha + nbytes / p / inter.beta)

    assert "Hint: this is a flat ring over the slow links" in repr(exercises.check_hierarchical_time(flat))


def test_scales_rounded_down_fail_on_a_partial_tile_with_a_hint():
    verdict = exercises.check_wire_ratio(lambda d, block: (d + 4 * (d // block)) / (4 * d))
    assert repr(verdict) == ("✗ check_wire_ratio: on input 5 of 12 (d=100, block=128) the result is 0.25, expected "
                             "0.26. Hint: a last, partial tile needs its scale too: ⌈d / block⌉ scales.")


def test_one_byte_scales_and_bf16_baseline_fail_with_hints():
    one_byte = exercises.check_wire_ratio(lambda d, block: (d + math.ceil(d / block)) / (4 * d))
    bf16 = exercises.check_wire_ratio(lambda d, block: (d + 4 * math.ceil(d / block)) / (2 * d))
    assert "Hint: each scale is an fp32: 4 bytes." in repr(one_byte)
    assert "Hint: the ratio is against fp32, 4 bytes a value, not bf16." in repr(bf16)


def test_an_unfilled_stub_raises_not_implemented():
    def stub(d, block):
        raise NotImplementedError("exercise 06.4: write wire_ratio")

    with pytest.raises(NotImplementedError, match="exercise 06.4"):
        exercises.check_wire_ratio(stub)
