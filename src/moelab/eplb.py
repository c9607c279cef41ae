"""Expert-parallel load balancer (EPLB): replicate hot experts and place the replicas so GPUs carry even loads.

With expert parallelism every GPU holds a few experts and the step waits for the busiest GPU, but routing is
skewed: a few experts take many of the tokens. DeepSeek-V3 therefore serves with redundant experts: more
*physical* expert slots (replicas) than *logical* experts. From recent per-expert loads, the balancer decides
how many replicas each expert gets (each replica takes an even share of its expert's tokens) and which GPU
holds each one. It has two policies. The hierarchical one, used when the nodes divide the expert groups
(prefill, smaller EP), packs whole groups onto nodes, so group-limited routing keeps its cross-node traffic;
it then replicates experts within each node and packs the replicas onto that node's GPUs. The global one
(decode, large EP) is the same with one group and one node.

Source: DeepSeek-V3 technical report §3.4 (redundant experts), and ``eplb.py`` in github.com/deepseek-ai/EPLB,
whose names, greedy choices and tie-breaking this module keeps, so it gives the same placements.

Shapes: ``weight`` is ``(layers, experts)``. GPU ``g`` holds slots ``g·S … (g+1)·S − 1``, ``S = num_replicas /
num_gpus``, and node ``k`` holds GPUs ``k·num_gpus/num_nodes`` to ``(k+1)·num_gpus/num_nodes − 1``.
"""
from __future__ import annotations

import torch

from .config import check, check_int, divisors


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack each row's ``n`` weighted items into ``num_packs`` packs of ``n / num_packs`` items each:
    heaviest item first, each into the lightest pack that still has room (the first such pack on a tie).
    Returns ``(pack_index, rank_in_pack)``, both shaped like ``weight``."""
    rows, n = weight.shape
    check_int("balanced_packing", "num_packs", num_packs)
    check(n % num_packs == 0, "balanced_packing", "num_packs", num_packs,
          f"it must divide the {n} items; allowed: {', '.join(map(str, divisors(n)))}")
    per_pack = n // num_packs
    if per_pack == 1:  # nothing to choose: item i goes to pack i
        return torch.arange(n).repeat(rows, 1), torch.zeros(rows, n, dtype=torch.int64)
    pack_index = torch.empty(rows, n, dtype=torch.int64)
    rank_in_pack = torch.empty(rows, n, dtype=torch.int64)
    for row, order in enumerate(weight.float().sort(-1, descending=True).indices):
        load = torch.zeros(num_packs)
        count = torch.zeros(num_packs, dtype=torch.int64)
        for item in order.tolist():
            pack = int(torch.where(count < per_pack, load, torch.inf).argmin())
            pack_index[row, item], rank_in_pack[row, item] = pack, count[pack]
            load[pack] += weight[row, item]
            count[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spread each row's ``num_log`` experts over ``num_phy`` replicas: one each, then every redundant replica in
    turn to the expert with the largest load per replica. Returns ``phy2log`` (the expert of each replica;
    replica ``i < num_log`` is expert ``i``), ``rank`` (which replica of its expert it is) and ``logcnt``."""
    rows, num_log = weight.shape
    check(num_phy >= num_log, "replicate_experts", "num_phy", num_phy, f"allowed: at least the {num_log} experts")
    phy2log = torch.arange(num_phy).repeat(rows, 1)
    rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(rows, num_log, dtype=torch.int64)
    row = torch.arange(rows)
    for phy in range(num_log, num_phy):
        hottest = (weight / logcnt).max(-1).indices
        phy2log[:, phy], rank[:, phy] = hottest, logcnt[row, hottest]
        logcnt[row, hottest] += 1
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse of each row's permutation."""
    return torch.empty_like(perm).scatter_(-1, perm, torch.arange(perm.size(-1)).expand_as(perm).contiguous())


def rebalance_experts_hierarchical(weight: torch.Tensor, num_physical_experts: int, num_groups: int,
                                   num_nodes: int, num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups onto nodes, replicas within each node, replicas onto the node's GPUs, for arguments that pass
    :func:`rebalance_experts`'s checks with ``num_nodes`` dividing ``num_groups``. Returns ``(phy2log, phyrank,
    logcnt)``; "mlog" numbers the experts node by node after step 1, "pphy" numbers the slots GPU by GPU."""
    num_layers, num_logical = weight.shape
    group_size, groups_per_node = num_logical // num_groups, num_groups // num_nodes
    # Step 1: pack the expert groups onto nodes; mlog2log lists the experts node by node.
    group_pack, group_rank = balanced_packing(weight.unflatten(-1, (num_groups, group_size)).sum(-1), num_nodes)
    group_start = (group_pack * groups_per_node + group_rank) * group_size
    log2mlog = (group_start.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)
    mlog2log = _inverse(log2mlog)
    # Step 2: replicate within each node (one row per layer and node).
    tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, num_logical // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes)
    # Step 3: pack each node's replicas, each carrying load / count, onto its GPUs.
    tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)
    gpu, rank_on_gpu = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(gpu * (num_physical_experts // num_gpus) + rank_on_gpu)
    node_start = torch.arange(0, num_logical, num_logical // num_nodes).view(1, -1, 1)
    pphy2mlog = (phy2mlog.gather(-1, pphy2phy).view(num_layers, num_nodes, -1) + node_start).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return pphy2log, pphyrank, logcnt


def _check_layout(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    """The argument checks of :func:`rebalance_experts`, each naming the argument and what is allowed."""
    owner = "rebalance_experts"
    check(weight.dim() == 2, owner, "weight.shape", tuple(weight.shape), "allowed: (layers, experts)")
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups),
                        ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        check_int(owner, name, value)
    experts = weight.size(1)
    check(experts % num_groups == 0, owner, "num_groups", num_groups,
          f"it must divide the {experts} experts; allowed: {', '.join(map(str, divisors(experts)))}")
    check(num_gpus % num_nodes == 0, owner, "num_gpus", num_gpus, f"allowed: a multiple of num_nodes = {num_nodes}")
    least = -(-experts // num_gpus) * num_gpus
    check(num_replicas % num_gpus == 0 and num_replicas >= experts, owner, "num_replicas", num_replicas,
          f"allowed: a multiple of num_gpus = {num_gpus}, at least the {experts} experts: "
          f"{least}, {least + num_gpus}, {least + 2 * num_gpus}, …")


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``num_replicas`` expert slots on ``num_gpus`` GPUs for the loads ``weight`` (layers, experts): the
    hierarchical policy if ``num_nodes`` divides ``num_groups``, else the global one. Returns ``phy2log``
    (layers, num_replicas): the expert in each slot; ``log2phy`` (layers, experts, most replicas): each expert's
    slots, padded with −1; ``logcnt`` (layers, experts): replicas per expert."""
    _check_layout(weight, num_replicas, num_groups, num_nodes, num_gpus)
    num_layers, num_logical = weight.shape
    weight = weight.float().cpu()
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, num_groups, num_nodes,
                                                                  num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    maxlogcnt = int(logcnt.max())
    log2phy = torch.full((num_layers, num_logical * maxlogcnt), -1, dtype=torch.int64)
    log2phy.scatter_(-1, phy2log * maxlogcnt + phyrank, torch.arange(num_replicas).repeat(num_layers, 1))
    return phy2log, log2phy.view(num_layers, num_logical, maxlogcnt), logcnt


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """(layers, num_gpus) load per GPU when each expert's load splits evenly over its ``logcnt`` replicas."""
    per_replica = (weight.float() / logcnt).gather(-1, phy2log)
    return per_replica.unflatten(-1, (num_gpus, -1)).sum(-1)


def contiguous_loads(weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """(layers, num_gpus) load per GPU without a balancer: one replica each, expert ``e`` on GPU
    ``e // (experts / num_gpus)``."""
    experts = weight.size(-1)
    check(experts % num_gpus == 0, "contiguous_loads", "num_gpus", num_gpus,
          f"it must divide the {experts} experts; allowed: {', '.join(map(str, divisors(experts)))}")
    return weight.float().unflatten(-1, (num_gpus, -1)).sum(-1)


def imbalance(loads: torch.Tensor) -> torch.Tensor:
    """Max over mean of the GPU loads, per layer: 1.0 is perfectly even; the step waits for the max."""
    return loads.max(-1).values / loads.mean(-1)
