"""Two-hop expert parallelism over the emulated network, and the capstone's ladder: outputs, bytes, replicas."""
import dataclasses

import pytest
import torch

from moelab.dist import launch
from moelab.experiments.capstone import SETUPS, CapstoneConfig, compare_rank, has
from moelab.experiments.expert_parallel import equivalence_rank, layer_config
from moelab.network import Network, Topology
from moelab.twohop import node_rows

pytestmark = pytest.mark.slow            # spawns ranks, runs JupyterLab or installs: not in make test-fast

TOPOLOGY = Topology(2, 2)


def test_node_rows_are_one_per_token_and_node_ordered_by_node():
    indices = torch.tensor([[0, 5], [1, 2], [7, 4], [6, 3]])        # 4 experts per node
    token, node, row_of = node_rows(indices, 4)
    assert token.tolist() == [0, 1, 3, 0, 2, 3] and node.tolist() == [0, 0, 0, 1, 1, 1]
    assert row_of.view(4, 2).tolist() == [[0, 3], [1, 1], [4, 4], [5, 2]]


@pytest.mark.parametrize("shard, limited", [({}, False), ({"two_hop": TOPOLOGY}, False),
                                            ({"two_hop": TOPOLOGY}, True)])
def test_expert_parallel_over_the_network_equals_one_process(shard, limited):
    cfg = layer_config(d_model=16, n_experts=8, top_k=2, d_expert=8)
    cfg = dataclasses.replace(cfg, n_group=2, topk_group=1) if limited else cfg
    shard = {"net": Network(TOPOLOGY, virtual=True), **shard}
    for checks in launch(equivalence_rank, 4, args=(cfg, 12, 0.0, shard), backend="gloo", timeout=120):
        checks.pop("received")
        for name, (got, expected) in checks.items():
            torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def ladder():
    run = CapstoneConfig(steps=4, batch_size=2, H=2, eval_every=4, eval_batches=1, warmup_steps=1)
    return launch(compare_rank, 4, args=(tuple(SETUPS), run), backend="gloo", timeout=300)[0]


def test_every_setup_sends_exactly_what_the_routing_says_per_link_class(ladder):
    for setup, r in ladder.items():
        assert set(r["sent_by_class"]) == {"fast", "slow"}, setup
        assert r["sent_by_class"] == r["analytic_by_class"], setup


def test_each_rung_sends_fewer_bytes_over_the_slow_link(ladder):
    slow = [ladder[s]["sent_by_class"]["slow"] for s in SETUPS]
    assert all(a > b for a, b in zip(slow, slow[1:])), slow


def test_replicas_agree_at_the_end_of_every_setup(ladder):
    for setup, r in ladder.items():
        assert len(set(r["replicas"])) == 1, (setup, r["replicas"])
        assert r["evals"][0]["sent_by_class"] == {}, "evaluation must not be counted"


def test_the_ladder_is_cumulative():
    assert has("diloco", "two_hop") and has("fp8", "node_limited") and not has("two_hop", "fp8")


@pytest.mark.parametrize("field, value, allowed", [("H", 0, ">= 1"), ("eval_every", 15, "a multiple of H"),
                                                   ("steps", 30, "a multiple of eval_every"),
                                                   ("outer_momentum", 1.0, "")])
def test_bad_capstone_settings_are_refused_by_name(field, value, allowed):
    with pytest.raises(ValueError, match=f"{field} = {value!r} is not allowed.*{allowed}"):
        CapstoneConfig(**{field: value})
