"""The checks of notebook 06's exercises: the published solutions pass, plausible wrong answers fail with a
message that names the input and the mistake, and an unfilled stub's NotImplementedError reaches the learner."""
import math

import pytest
from solutions import load

from moelab import exercises

NS = load("06_collectives.ipynb")
SLOW_24 = "on input 1 of 11 (nbytes=1000000, p=24, link=Link(name='slow', alpha=0.005, beta=10000000.0))"


def test_the_published_solutions_pass():
    assert exercises.check_all_reduce_times(NS["all_reduce_times"])
    assert exercises.check_chunk_sizes(NS["chunk_sizes"])
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


def test_remainder_on_the_last_chunk_fails_with_a_hint():
    verdict = exercises.check_chunk_sizes(lambda n, p: [n // p] * (p - 1) + [n - (p - 1) * (n // p)])
    assert repr(verdict) == ("✗ check_chunk_sizes: on input 1 of 12 (n=1001, p=4) the result[0] is 250, expected 251."
                             " Hint: spread the remainder n mod p over the first chunks, one element each, not all on "
                             "the last.")


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
