"""The MoE layer's dispatcher seam, the exchange context and the wire formats, in one process."""
import dataclasses

import pytest
import torch

from moelab.config import ConfigError, ModelConfig
from moelab.dispatch import LocalDispatcher
from moelab.exchange import Exchange
from moelab.moe import MoE
from moelab.network import Network, Topology
from moelab.timeline import Timeline
from moelab.wire import WIRES, round_trip_bytes, row_bytes, wire_named


def small_moe(**fields) -> MoE:
    torch.manual_seed(0)
    return MoE(ModelConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, d_model=16, n_routed_experts=4, top_k=2,
                           d_expert=8, **fields))


def test_the_layer_moves_its_tokens_through_whatever_dispatcher_it_holds():
    moe, x = small_moe(), torch.randn(2, 5, 16)
    grouped = moe(x)
    moe.dispatcher = LocalDispatcher("loop")
    torch.testing.assert_close(moe(x), grouped, rtol=1e-5, atol=1e-6)

    calls = []

    class Halving:                                   # any object with the protocol plugs in
        expert_parallel = False

        def __call__(self, rows, routing, experts, training):
            calls.append((rows.shape, training))
            y, kept = LocalDispatcher()(rows, routing, experts, training)
            return y / 2, kept

        def phase(self, name):
            return LocalDispatcher().phase(name)

        def total_counts(self, counts):
            return counts

    moe.dispatcher = Halving()
    moe.eval()
    shared = moe.shared(x.reshape(-1, 16)).view_as(x) if moe.shared is not None else 0
    torch.testing.assert_close(moe(x) - shared, (grouped - shared) / 2, rtol=1e-5, atol=1e-6)
    assert calls == [(torch.Size([10, 16]), False)]


def test_capacity_dispatch_drops_in_training_only():
    moe = small_moe(dispatch="capacity", capacity_factor=0.5)
    assert moe.dispatcher.method == "capacity" and not moe.expert_parallel
    x = torch.randn(4, 8, 16)
    moe.train()
    moe(x)
    assert moe.dropped > 0
    moe.eval()
    moe(x)
    assert moe.dropped == 0


def test_a_local_dispatcher_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="method = 'einsum' is not allowed; allowed: loop, sorted, grouped, capacity"):
        LocalDispatcher("einsum")


def test_the_exchange_is_a_small_frozen_object_checked_when_made():
    ex = Exchange(wire="fp8")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.wire = "fp32"
    assert ex.formats == WIRES["fp8"] and dataclasses.replace(ex, timeline=Timeline()).wire == "fp8"
    with pytest.raises(ConfigError, match="wire.name = 'int4' is not allowed; allowed: fp32, fp8"):
        Exchange(wire="int4")
    with pytest.raises(ValueError, match="Exchange: group is not allowed with net"):
        Exchange(group=object(), net=Network(Topology(1, 2)))


@pytest.mark.parametrize("d", [64, 128, 160, 7168])
def test_a_rows_bytes_per_trip_and_on_all_four_trips(d):
    tiles = -(-d // 128)
    assert [row_bytes(d, f) for f in ("fp32", "bf16", "fp8")] == [4 * d, 2 * d, d + 4 * tiles]
    assert round_trip_bytes(d, "fp32") == 16 * d
    assert round_trip_bytes(d, "fp8") == (d + 4 * tiles) + 3 * 2 * d        # FP8 dispatch, three BF16 trips
    assert wire_named("fp8").trips() == ("fp8", "bf16", "bf16", "bf16")


def test_wire_formats_refuse_what_they_do_not_know():
    with pytest.raises(ConfigError, match="row_bytes.fmt = 'fp16' is not allowed; allowed: fp32, bf16, fp8"):
        row_bytes(64, "fp16")
    with pytest.raises(ConfigError, match="wire.name = 'bf16' is not allowed; allowed: fp32, fp8"):
        round_trip_bytes(64, "bf16")
