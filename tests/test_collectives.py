"""Hand-written collectives equal torch.distributed's built-ins (gloo) on 2–6 ranks, and count their bytes."""
import time

import pytest
import torch
import torch.distributed as dist

from moelab import collectives as C
from moelab.dist import RankError, launch
from moelab.network import SLOW, Link, Network, Topology, cost
from moelab.quant import quantize
from moelab.timeline import Timeline

pytestmark = pytest.mark.slow            # spawns ranks, runs JupyterLab or installs: not in make test-fast


def factorizations(p):
    return [Topology(n, p // n) for n in range(1, p + 1) if p % n == 0]


def inputs(rank, p):
    """Per element count (0, 1, not divisible by p, larger): an int64 tensor (sums exact) and a float32 one."""
    out = []
    for n in (0, 1, 3 * p + 2, 64 * p + 5):
        g = torch.Generator().manual_seed(100 * rank + n)
        out.append(torch.randint(-1000, 1000, (n,), generator=g))
        out.append(torch.randn(n, generator=g))
    out.append(torch.randn(3, 5, generator=torch.Generator().manual_seed(rank)))   # not flat
    return out


def builtin_all_reduce(x):
    y = x.clone()
    if y.numel():
        dist.all_reduce(y)
    return y


def uneven_splits(p):
    """rows from i to j: uneven, with zeros (rank 0 sends nothing to the last rank)."""
    return torch.tensor([[0 if (i, j) == (0, p - 1) else (i + 2 * j) % 4 + (i == j) for j in range(p)]
                         for i in range(p)])


def compare_rank(rank, p):
    pairs = []                                     # (name, got, expected)
    for x in inputs(rank, p):
        tag = f"{x.dtype} n={x.numel()}"
        total = builtin_all_reduce(x)
        pairs.append((f"ring all-reduce {tag}", C.ring_all_reduce(x), total))
        pairs.append((f"halving-doubling {tag}", C.halving_doubling_all_reduce(x), total))
        for topo in factorizations(p):
            pairs.append((f"hierarchical {topo.nodes}x{topo.per_node} {tag}", C.hierarchical_all_reduce(x, topo),
                          total))
        chunk = torch.tensor_split(total.flatten(), p)[rank]
        pairs.append((f"ring reduce-scatter {tag}", C.ring_reduce_scatter(x), chunk))
        gathered = [torch.empty_like(x) for _ in range(p)]
        dist.all_gather(gathered, x)
        pairs.append((f"ring all-gather {tag}", C.ring_all_gather(x), torch.stack(gathered)))
        for root in {0, p - 1}:
            expected = x.clone()
            if x.numel():
                dist.broadcast(expected, root)
            pairs.append((f"tree broadcast root {root} {tag}", C.tree_broadcast(x, root), expected))
            reduced = C.tree_reduce(x, root)
            pairs.append((f"tree reduce root {root} {tag}", reduced if rank == root else torch.zeros(()),
                          total if rank == root else torch.zeros(())))
    counts = uneven_splits(p)
    for dtype in (torch.int64, torch.float32):
        g = torch.Generator().manual_seed(rank)
        rows = (torch.randn(int(counts[rank].sum()), 3, generator=g) * 100).to(dtype)
        expected = rows.new_empty((int(counts[:, rank].sum()), 3))
        dist.all_to_all_single(expected, rows, counts[:, rank].tolist(), counts[rank].tolist())
        got = C.pairwise_all_to_all(rows, counts[rank].tolist(), counts[:, rank].tolist())
        pairs.append((f"pairwise all-to-all {dtype}", got, expected))
        for topo in factorizations(p):
            pairs.append((f"hierarchical all-to-all {topo.nodes}x{topo.per_node} {dtype}",
                          C.hierarchical_all_to_all(rows, counts, topo), expected))
    return pairs


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6])
def test_every_collective_equals_the_builtin(p):
    for rank, pairs in enumerate(launch(compare_rank, p, backend="gloo", timeout=120)):
        for name, got, expected in pairs:
            assert got.shape == expected.shape and got.dtype == expected.dtype, f"rank {rank} {name}"
            if expected.dtype.is_floating_point:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"rank {rank} {name}")
            else:
                assert torch.equal(got, expected), f"rank {rank} {name}"


def counting_rank(rank, p, topo):
    """Each algorithm once on an emulated network; the bytes each rank sent per link class."""
    net = Network(topo, intra=Link("fast", 0.0, 1e12), inter=Link("slow", 0.0, 1e12))
    x = torch.ones(8 * p * topo.per_node, dtype=torch.float32)         # divisible by p and by G·N
    out = {}
    for name, run in [("ring", lambda: C.ring_all_reduce(x, net)),
                      ("hierarchical", lambda: C.hierarchical_all_reduce(x, topo, net)),
                      ("pairwise", lambda: C.pairwise_all_to_all(x.view(p, -1), [1] * p, [1] * p, net)),
                      ("two-hop", lambda: C.hierarchical_all_to_all(x.view(p, -1), torch.ones(p, p, dtype=torch.long),
                                                                    topo, net))]:
        net.reset()
        run()
        out[name] = (dict(net.sent_bytes), dict(net.messages))
    return out


def test_byte_counters_equal_the_analytic_counts_on_two_nodes_of_two():
    p, topo = 4, Topology(2, 2)
    n_bytes = 8 * p * 2 * 4                                            # the buffer, fp32
    for rank, out in enumerate(launch(counting_rank, p, args=(topo,), backend="gloo", timeout=60)):
        right_is_slow = topo.node(rank) != topo.node((rank + 1) % p)
        ring_bytes, ring_msgs = out["ring"]
        link = "slow" if right_is_slow else "fast"
        # reduce-scatter rounds send their chunk in C.SEGMENTS pieces, all-gather rounds in one
        assert ring_bytes == {link: 2 * (p - 1) * n_bytes // p} and ring_msgs == {link: (p - 1) * (C.SEGMENTS + 1)}
        hier_bytes, _ = out["hierarchical"]
        G, N = topo.per_node, topo.nodes
        # inside: ring RS + AG over G ranks; across: ring RS + AG over N ranks of the node's 1/G chunk
        assert hier_bytes == {"fast": 2 * (G - 1) * n_bytes // G, "slow": 2 * (N - 1) * n_bytes // G // N}
        row = n_bytes // p
        flat_bytes, flat_msgs = out["pairwise"]
        assert flat_bytes == {"fast": (G - 1) * row, "slow": (p - G) * row} and flat_msgs["slow"] == p - G
        two_hop_bytes, two_hop_msgs = out["two-hop"]
        assert two_hop_bytes["slow"] == (p - G) * row and two_hop_msgs["slow"] == N - 1   # one message per node
        # inside the node each rank forwards what came from the other node, for its G − 1 neighbours
        assert two_hop_bytes["fast"] == (G - 1) * N * row


def emulated_rank(rank, p, link):
    net, timeline = Network(Topology(1, p), intra=link, inter=link), Timeline()
    C.ring_all_reduce(torch.ones(1000 * p), net, timeline)
    return [(e.start, e.end) for e in timeline.events]


def test_each_emulated_round_lasts_at_least_its_alpha_beta_time():
    link = Link("emulated", alpha=5e-3, beta=1e6)
    p = 3
    for rounds in launch(emulated_rank, p, args=(link,), backend="gloo", timeout=60):
        assert len(rounds) == 2 * (p - 1)
        ends = [rounds[0][0]] + [end for _, end in rounds]            # a round ends >= α + n/β after the last
        assert all(b - a >= link.time(1000 * 4) for a, b in zip(ends, ends[1:]))
        assert ends[-1] - ends[0] >= cost("ring_all_reduce", 1000 * p * 4, p, link)


def virtual_rank(rank, p, link):
    net = Network(Topology(1, p), intra=link, inter=link, virtual=True)
    net.reset()
    real, simulated = time.perf_counter(), net.now()
    C.ring_all_reduce(torch.ones(1000 * p), net)
    real, simulated = time.perf_counter() - real, net.now() - simulated
    with net.paused():
        time.sleep(0.05)
    return real, simulated, net.link_seconds, net.now() - net.clock


def test_a_virtual_network_simulates_the_alpha_beta_time_without_sleeping_it():
    link, p = Link("emulated", alpha=0.5, beta=1e4), 3                 # 2(p−1) rounds of 0.9 s each
    predicted = cost("ring_all_reduce", 1000 * p * 4, p, link)
    for real, simulated, link_seconds, after_pause in launch(virtual_rank, p, args=(link,), backend="gloo",
                                                             timeout=60):
        assert real < predicted / 10
        assert link_seconds == pytest.approx(predicted)
        assert predicted <= simulated < predicted + 0.5                 # plus this laptop's own work
        assert after_pause < 0.05                                       # the paused sleep did not count
    with pytest.raises(ValueError, match="virtual = False is not allowed"):
        with Network(Topology(1, 1)).paused():
            pass


def bad_rank(rank, p, case):
    x = torch.zeros(4, 2)
    if case == "root":
        C.tree_broadcast(x, root=p)
    elif case == "splits":
        C.pairwise_all_to_all(x, [1] * p, [1] * p)
    else:
        C.hierarchical_all_reduce(x, Topology(3, 1))


@pytest.mark.parametrize("case, message", [
    ("root", "root = 2 is not allowed; allowed: a rank in 0..1"),
    ("splits", "send_splits add up to 2 rows but x has 4; allowed: equal"),
    ("topology", r"topology has 3 nodes × 1 ranks = 3, but the world has 2 ranks; allowed: nodes × per_node")])
def test_bad_arguments_are_refused_with_the_field_and_what_is_allowed(case, message):
    with pytest.raises(RankError, match=message):
        launch(bad_rank, 2, args=(case,), backend="gloo", timeout=60)


def test_link_and_topology_refuse_bad_values_and_cost_names_the_algorithms():
    with pytest.raises(ValueError, match="beta = 0 is not allowed"):
        Link("x", 1e-6, 0)
    with pytest.raises(ValueError, match="nodes = 0 is not allowed"):
        Topology(0, 2)
    with pytest.raises(ValueError, match="algorithm = 'bogus' is not allowed; allowed: ring_all_reduce"):
        cost("bogus", 1, 2, SLOW)
    t = Topology(2, 4)
    assert (t.world, t.node(5), t.local(5), t.rank(1, 1), t.node_ranks(1), t.peers(2)) == \
           (8, 1, 1, 5, [4, 5, 6, 7], [2, 6])


def compressed_rank(rank, p, fmt):
    counts = uneven_splits(p)
    d = 200

    def rows_of(src):
        return torch.randn(int(counts[src].sum()), d, generator=torch.Generator().manual_seed(src)) * (src + 1)

    q, scales = C.compressed_all_to_all(rows_of(rank), counts[rank].tolist(), counts[:, rank].tolist(), fmt)
    expected = []
    for src in range(p):                       # what each sender quantised for this rank, in source order
        sq, ss = quantize(rows_of(src), fmt)
        start = int(counts[src, :rank].sum())
        expected.append((sq[start:start + counts[src, rank]], ss[start:start + counts[src, rank]]))
    gq, gs = C.compressed_all_gather(rows_of(0)[:3] + rank, fmt)
    return (q, scales, torch.cat([e[0] for e in expected]), torch.cat([e[1] for e in expected]), gq, gs,
            [quantize(rows_of(0)[:3] + r, fmt) for r in range(p)])


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_compressed_all_to_all_and_all_gather_deliver_the_senders_exact_bytes(fmt):
    for q, scales, eq, es, gq, gs, gathered in launch(compressed_rank, 3, args=(fmt,), backend="gloo", timeout=60):
        assert q.dtype == eq.dtype and torch.equal(q.view(torch.uint8), eq.view(torch.uint8))
        assert torch.equal(scales, es)
        assert torch.equal(gq.view(torch.uint8), torch.stack([g[0] for g in gathered]).view(torch.uint8))
        assert torch.equal(gs, torch.stack([g[1] for g in gathered]))


def test_node_limited_routing_bytes_equal_the_counts_taken_from_the_routing():
    from moelab.experiments.collectives import routing_rank

    topo = Topology(2, 2)
    results = launch(routing_rank, 4, args=(topo, 16, 4, 32, 8, [1, 2]), backend="gloo", timeout=120)
    row = 8 * 4
    for M in (0, 1):
        flat, per_rank, two_hop = (sum(r[M][f"{k}_bytes"] for r in results) for k in ("flat", "per_rank", "two_hop"))
        assert flat == sum(r[M]["flat_analytic"] for r in results) > 0
        assert per_rank == sum(r[M]["per_rank_analytic"] for r in results)
        assert two_hop == sum(r[M]["two_hop_analytic"] for r in results)
        assert two_hop <= per_rank <= flat and two_hop <= (M + 1) * 4 * 32 * row   # ≤ M remote nodes per token
    assert all(r[0]["nodes_per_token"] == 1.0 for r in results)          # M = 1: every token on one node
