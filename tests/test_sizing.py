"""The memory planner against a hand computation, its bad input, and the MoE traffic model against the bytes the
expert-parallel layer moves."""
import pytest

from moelab.config import ConfigError, ModelConfig
from moelab.dist import launch
from moelab.experiments.expert_parallel import layer_config, layer_rank
from moelab.network import Link
from moelab.sizing import Cluster, Layout, memory_per_device, moe_step_time, moe_traffic, row_bytes

SMALL = ModelConfig(vocab_size=100, d_model=64, n_layer=4, n_head=4, n_kv_head=4, d_ff=128, n_routed_experts=8,
                    top_k=2, d_expert=32, first_k_dense=1)


def test_memory_per_device_equals_a_hand_computation():
    # parameters by hand: embedding and head 2·100·64, norms 2·4·64 + 64, attention 4 layers × 4·64·64, one dense
    # FFN 3·64·128, routed experts 3 layers × 8 × 3·64·32, routers 3 × 8 × 64
    routed = 3 * 8 * 3 * 64 * 32
    rest = 2 * 100 * 64 + (2 * 4 * 64 + 64) + 4 * 4 * 64 * 64 + 3 * 64 * 128 + 3 * 8 * 64
    layout = Layout(dp=4, tp=2, pp=2, ep=2, zero1=True)
    experts, others = routed / (2 * 2), rest / (2 * 2)           # experts: ep × pp; the rest: tp × pp
    got = memory_per_device(SMALL, layout, weights="bf16", tokens_per_device=1000, kv_tokens=500)
    assert layout.devices == 16
    assert got["weights"] == 2 * (experts + others) == got["gradients"]
    assert got["optimizer"] == (8 + 4) * (experts / (4 // 2) + others / 4)        # ZeRO-1 over the replicas
    assert got["activations"] == 34 * 64 * (4 / 2) * 1000 / 2
    assert got["kv_cache"] == 500 * (2 * 4 * 16) * (4 / 2) * 2 / 2
    assert got["total"] == sum(v for k, v in got.items() if k != "total")
    fp32 = memory_per_device(SMALL, Layout(), weights="fp32")
    assert fp32["optimizer"] == 8 * (routed + rest) and fp32["weights"] == 4 * (routed + rest)
    assert memory_per_device(SMALL, Layout(), weights="fp8", grads="none")["optimizer"] == 0
    deepseek_recipe = memory_per_device(SMALL, layout, weights="bf16", grads="fp32", moments="bf16")
    assert deepseek_recipe["gradients"] == 4 * (experts + others)
    assert deepseek_recipe["optimizer"] == (2 * 2 + 4) * (experts / 2 + others / 4)


@pytest.mark.parametrize("call, message", [
    (lambda: Layout(dp=3, ep=2), "Layout.ep = 2 is not allowed; allowed: a divisor of dp = 3"),
    (lambda: memory_per_device(SMALL, Layout(), weights="int4"), "memory_per_device.weights = 'int4'"),
    (lambda: row_bytes(64, "fp16"), "row_bytes.fmt = 'fp16' is not allowed; allowed: fp32, bf16, fp8")])
def test_bad_sizing_input_names_the_field(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


@pytest.mark.slow
@pytest.mark.parametrize("wire", ["fp32", "fp8"])
def test_moe_traffic_equals_the_payload_the_expert_parallel_layer_moves(wire):
    config, tokens = layer_config(), 256
    result = launch(layer_rank, 2, args=(config, tokens, 1, 0, 0.0, 0, wire), backend="gloo", timeout=120)
    combine_wire = "bf16" if wire == "fp8" else "fp32"
    expected = moe_traffic(config, dispatch=wire, combine=combine_wire)
    phases = [{e["phase"]: e for e in r["events"][0]} for r in result]
    for mine in phases:                                   # every rank dispatches top_k rows of each of its tokens
        assert mine["dispatch"]["sent"] + mine["dispatch"]["local"] == expected["dispatch"] * tokens
    # and sends back the rows its experts processed: all of them together, top_k per token
    assert sum(p["combine"]["sent"] + p["combine"]["local"] for p in phases) == expected["combine"] * tokens * 2


def test_node_limited_routing_caps_the_copies_that_cross_nodes():
    v3 = ModelConfig(vocab_size=10, d_model=7168, n_head=56, n_routed_experts=256, top_k=8, n_group=8, topk_group=4)
    free, limited = moe_traffic(v3), moe_traffic(v3, node_limit=4)
    assert free["dispatch"] == 8 * (7168 + 4 * 56) and free["combine"] == 8 * 2 * 7168
    assert limited["inter_node_max"] * 2 == free["inter_node_max"]


def test_moe_step_time_equals_a_hand_computation():
    cluster = Cluster("toy", gpus_per_node=4, flops=1e12, mfu=0.5, nvlink=Link("nvlink", 1e-6, 100e9),
                      network=Link("net", 1e-5, 10e9))
    t = moe_step_time(SMALL, cluster, nodes=2, tokens_per_device=1000, dispatch="bf16", combine="bf16",
                      node_limit=1)
    active = 2 * 100 * 64 + (2 * 4 * 64 + 64) + 4 * 4 * 64 * 64 + 3 * 64 * 128 + 3 * 8 * 64 + 3 * 2 * 3 * 64 * 32
    assert t["compute"] == pytest.approx(6 * (active - 100 * 64) * 1000 / 0.5e12)
    row_pair = 2 * 64 + 2 * 64                                  # one bf16 copy out, one back
    network_layer = 1 * (2 - 1) / 2 * row_pair * 1000 / 10e9 + 1e-5  # node limit 1: one copy crosses, half the time
    nvlink_layer = 2 * (4 - 1) / 4 * row_pair * 1000 / 100e9 + 1e-6
    assert t["network"] == pytest.approx(2 * 3 * network_layer) and t["nvlink"] == pytest.approx(2 * 3 * nvlink_layer)
    assert t["communication"] == pytest.approx(2 * 3 * max(network_layer, nvlink_layer))
    assert t["no_overlap"] == pytest.approx(t["compute"] + t["communication"])
    assert t["perfect_overlap"] == max(t["compute"], t["communication"])
