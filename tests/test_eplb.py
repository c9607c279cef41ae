"""The expert-parallel load balancer (moelab.eplb): the EPLB README example, the placement invariants, balance."""
import pytest
import torch

from moelab.config import ConfigError
from moelab.eplb import balanced_packing, contiguous_loads, gpu_loads, imbalance, rebalance_experts, replicate_experts

# The example in github.com/deepseek-ai/EPLB's README: 2 layers of 12 experts in 4 groups, 16 slots on 2 nodes × 4 GPUs.
README_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                               [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def zipf(layers: int, experts: int, s: float, seed: int = 0) -> torch.Tensor:
    """Zipf-like loads (the k-th hottest expert gets 1000 / k**s tokens), shuffled differently in every layer."""
    g = torch.Generator().manual_seed(seed)
    ranked = 1000 / torch.arange(1, experts + 1).float() ** s
    return torch.stack([ranked[torch.randperm(experts, generator=g)] for _ in range(layers)])


def test_reproduces_the_readme_example():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert torch.equal(phy2log, README_PHY2LOG)
    # logcnt and log2phy as the repository's eplb.py returns them for the same call.
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert log2phy[0, :6].tolist() == [[12, -1], [15, 13], [11, -1], [6, -1], [7, 5], [0, 2]]


def test_global_policy_matches_the_repository():
    # 4 groups do not split over 3 nodes, so this is the global policy (it equals num_groups = num_nodes = 1).
    # Expected: what the repository's eplb.py returns for the same call.
    phy2log, _, logcnt = rebalance_experts(README_WEIGHT, 18, 4, 3, 6)
    assert phy2log.tolist() == [[11, 4, 2, 5, 10, 7, 5, 9, 6, 8, 10, 0, 1, 10, 4, 1, 3, 0],
                                [5, 1, 2, 5, 1, 2, 6, 7, 4, 6, 3, 11, 8, 9, 10, 8, 7, 0]]
    assert logcnt.tolist() == [[2, 2, 1, 1, 2, 2, 1, 1, 1, 1, 3, 1], [1, 2, 2, 1, 1, 2, 2, 2, 2, 1, 1, 1]]
    assert torch.equal(rebalance_experts(README_WEIGHT, 18, 1, 1, 6)[0], phy2log)


CONFIGS = [  # (experts, num_replicas, num_groups, num_nodes, num_gpus)
    (12, 16, 4, 2, 8),    # hierarchical, 2 slots per GPU
    (64, 96, 8, 2, 8),    # hierarchical, DeepSeek-like groups
    (64, 80, 1, 1, 8),    # global
    (64, 72, 4, 8, 8),    # 4 groups do not split over 8 nodes: global
    (16, 16, 4, 4, 16),   # one slot per GPU, no redundant experts
]


@pytest.mark.parametrize("experts, num_replicas, num_groups, num_nodes, num_gpus", CONFIGS)
def test_placement_invariants(experts, num_replicas, num_groups, num_nodes, num_gpus):
    weight = zipf(3, experts, 1.2)
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    assert phy2log.shape == (3, num_replicas) and logcnt.shape == (3, experts)
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == num_replicas).all()
    for layer in range(3):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=experts), logcnt[layer])
        for e in range(experts):
            slots = log2phy[layer, e]
            held, pad = slots[:logcnt[layer, e]], slots[logcnt[layer, e]:]
            assert (phy2log[layer, held] == e).all() and (pad == -1).all()
        assert sorted(log2phy[layer][log2phy[layer] >= 0].tolist()) == list(range(num_replicas))


def test_balanced_packing_fills_every_pack_equally():
    weight = zipf(2, 24, 1.0)
    pack_index, rank_in_pack = balanced_packing(weight, 4)
    for layer in range(2):
        assert torch.bincount(pack_index[layer], minlength=4).tolist() == [6] * 4
        for pack in range(4):
            assert sorted(rank_in_pack[layer, pack_index[layer] == pack].tolist()) == list(range(6))


def test_balanced_packing_is_greedy_heaviest_first():
    pack_index, rank_in_pack = balanced_packing(torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0, 6.0]]), 2)
    # 6 → pack 0; 5 → pack 1; 4 → pack 1 (5 < 6); 3 → pack 0 (6 < 9); 2 → pack 0 (a 9-9 tie goes to the first
    # pack), which is then full; 1 → pack 1. Packs 6+3+2 = 11 and 5+4+1 = 10.
    assert pack_index.tolist() == [[1, 1, 1, 0, 0, 0]]
    assert rank_in_pack.tolist() == [[0, 2, 1, 1, 2, 0]]


def test_replicate_experts_gives_the_hot_expert_the_most_replicas():
    weight = torch.tensor([[10.0, 100.0, 30.0, 20.0]])
    phy2log, rank, logcnt = replicate_experts(weight, 9)
    assert logcnt.tolist() == [[1, 5, 2, 1]]  # 100/5 = 20 ≤ every other load per replica
    assert phy2log[0, :4].tolist() == [0, 1, 2, 3]
    assert rank[0, phy2log[0] == 1].tolist() == [0, 1, 2, 3, 4]


def test_hot_expert_gets_the_most_replicas():
    weight = zipf(4, 64, 1.2)
    _, _, logcnt = rebalance_experts(weight, 80, 1, 1, 8)
    assert torch.equal(logcnt.argmax(-1), weight.argmax(-1))


def test_hierarchical_policy_keeps_each_group_on_one_node():
    experts, groups, nodes, gpus, replicas = 64, 8, 2, 8, 96
    phy2log, _, _ = rebalance_experts(zipf(3, experts, 1.2), replicas, groups, nodes, gpus)
    group_of_slot = (phy2log // (experts // groups)).view(3, nodes, -1)  # (layer, node, slot on node)
    for layer in range(3):
        node_groups = [set(group_of_slot[layer, node].tolist()) for node in range(nodes)]
        assert all(len(s) == groups // nodes for s in node_groups)
        assert set.union(*node_groups) == set(range(groups))  # so no group is on two nodes
        for node in range(nodes):  # every expert of the node's groups is there
            on_node = set(phy2log[layer].view(nodes, -1)[node].tolist())
            assert on_node == {e for e in range(experts) if e // (experts // groups) in node_groups[node]}


@pytest.mark.parametrize("num_groups, num_nodes", [(1, 1), (8, 2)])
def test_balancing_evens_out_skewed_loads(num_groups, num_nodes):
    weight = zipf(4, 64, 1.5)
    before = imbalance(contiguous_loads(weight, 8))
    previous = before
    for redundant in (0, 8, 16, 32):
        phy2log, _, logcnt = rebalance_experts(weight, 64 + redundant, num_groups, num_nodes, 8)
        loads = gpu_loads(weight, phy2log, logcnt, 8)
        assert torch.allclose(loads.sum(-1), weight.sum(-1))  # replicas split the load, none lost
        after = imbalance(loads)
        assert (after <= previous + 1e-6).all(), (redundant, after, previous)
        previous = after
    assert (previous < 0.5 * before).all()


def test_gpu_loads_and_baseline_agree_without_replicas():
    weight = zipf(2, 16, 1.0)
    identity = torch.arange(16).repeat(2, 1)
    assert torch.allclose(gpu_loads(weight, identity, torch.ones(2, 16, dtype=torch.int64), 4),
                          contiguous_loads(weight, 4))
    assert imbalance(torch.full((3, 8), 7.0)).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("weight, args, message", [
    (torch.ones(12), (16, 4, 2, 8), r"rebalance_experts\.weight\.shape = \(12,\) is not allowed"),
    (torch.ones(2, 12), (20, 4, 2, 8), r"num_replicas = 20 is not allowed; allowed: a multiple of num_gpus = 8"),
    (torch.ones(2, 12), (8, 4, 2, 8), r"num_replicas = 8 is not allowed; .* at least the 12 experts: 16, 24"),
    (torch.ones(2, 12), (16, 5, 1, 8), r"num_groups = 5 is not allowed; it must divide the 12 experts; "
                                       r"allowed: 1, 2, 3, 4, 6, 12"),
    (torch.ones(2, 12), (18, 4, 2, 9), r"num_gpus = 9 is not allowed; allowed: a multiple of num_nodes = 2"),
    (torch.ones(2, 12), (16, 4, 0, 8), r"num_nodes = 0 is not allowed; allowed: an integer >= 1"),
    (torch.ones(2, 12), (16.0, 4, 2, 8), r"num_replicas = 16.0 is not allowed"),
])
def test_bad_input_names_the_argument_and_what_is_allowed(weight, args, message):
    with pytest.raises(ConfigError, match=message):
        rebalance_experts(weight, *args)
    assert issubclass(ConfigError, ValueError)


def test_helpers_reject_bad_sizes():
    with pytest.raises(ValueError, match=r"balanced_packing\.num_packs = 5 .* allowed: 1, 2, 3, 4, 6, 12"):
        balanced_packing(torch.ones(1, 12), 5)
    with pytest.raises(ValueError, match=r"replicate_experts\.num_phy = 3 .* at least the 4 experts"):
        replicate_experts(torch.ones(1, 4), 3)
    with pytest.raises(ValueError, match=r"contiguous_loads\.num_gpus = 5"):
        contiguous_loads(torch.ones(1, 12), 5)
