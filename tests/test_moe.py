"""The MoE layer in the model: layer placement, shared experts, balancing losses, bias updates, training."""
import pytest
import torch

from moelab.config import ConfigError, ModelConfig
from moelab.data import build
from moelab.ffn import SwiGLU
from moelab.model import Transformer, parameter_counts
from moelab.moe import MoE
from moelab.train import TrainConfig, train


def moe_config(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 20, "block_size": 16, "n_layer": 3, "n_head": 2, "d_model": 32,
                          "n_routed_experts": 8, "top_k": 2, "d_expert": 16, **kw})


def test_first_k_dense_layers_stay_dense():
    model = Transformer(moe_config(first_k_dense=1, n_shared_experts=1))
    kinds = [type(layer.ffn) for layer in model.layers]
    assert kinds == [SwiGLU, MoE, MoE] and len(model.moe_layers) == 2
    assert model.layers[1].ffn.shared.w_up.out_features == 16  # n_shared_experts · d_expert
    assert all(type(layer.ffn) is SwiGLU for layer in Transformer(moe_config(n_routed_experts=0)).layers)


def test_parameter_counts_skip_the_unused_experts():
    model = Transformer(moe_config(first_k_dense=1))
    counts = parameter_counts(model)
    expert = 3 * 32 * 16
    assert counts["total"] - counts["active"] == 2 * (8 - 2) * expert
    dense = Transformer(moe_config(n_routed_experts=0))
    assert parameter_counts(dense)["active"] == parameter_counts(dense)["total"]


def test_shared_expert_adds_a_dense_swiglu_of_the_same_tokens():
    torch.manual_seed(0)
    layer = MoE(moe_config(n_shared_experts=2))
    x = torch.randn(2, 5, 32)
    routed_only = MoE(moe_config())
    routed_only.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared")})
    torch.testing.assert_close(layer(x), routed_only(x) + layer.shared(x))


def test_counts_aux_loss_and_dropped_fraction_are_recorded():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32)
    quiet = MoE(moe_config())
    quiet(x)
    assert int(quiet.counts.sum()) == 4 * 8 * 2 and quiet.aux_loss.item() == 0.0 and quiet.dropped == 0.0
    loud = MoE(moe_config(aux_loss_coef=0.01, z_loss_coef=0.001, seq_aux_coef=0.1, dispatch="capacity",
                          capacity_factor=0.5))
    loud(x)
    assert loud.aux_loss.item() > 0.01 and 0.4 <= loud.dropped < 1.0  # capacity 0.5: at least half dropped


def test_bias_moves_only_in_training_and_only_when_asked():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32)
    layer = MoE(moe_config(router="sigmoid", bias_update_speed=0.001))
    layer.eval()
    layer(x)
    layer.after_step()
    assert layer.router.bias.abs().sum() == 0
    layer.train()
    layer(x)
    counts = layer.counts.float()
    layer.after_step()
    torch.testing.assert_close(layer.router.bias, 0.001 * torch.sign(counts.mean() - counts))
    assert layer.router.bias.abs().sum() > 0 and layer.step_counts.sum() == 0
    frozen = MoE(moe_config(router="sigmoid"))
    frozen(x)
    frozen.after_step()
    assert frozen.router.bias.abs().sum() == 0


@pytest.mark.parametrize("dispatch", ["loop", "sorted", "grouped", "capacity"])
def test_an_moe_language_model_trains_and_records_its_routing(dispatch):
    data = build({"a": "the cat sat on the mat.\n" * 40, "b": "12+30=42\n" * 80})
    cfg = moe_config(vocab_size=data.tokenizer.vocab_size, router="sigmoid", dispatch=dispatch,
                     bias_update_speed=0.01, aux_loss_coef=0.01, n_shared_experts=1, first_k_dense=1)
    torch.manual_seed(0)
    history = train(Transformer(cfg), data, TrainConfig(max_steps=20, batch_size=4, warmup_steps=2,
                                                        eval_interval=10, eval_batches=1), progress=False)
    assert history.eval_val[-1] < 0.8 * history.eval_val[0]
    counts = torch.tensor(history.expert_counts)                                  # (steps, MoE layers, E)
    assert counts.shape == (20, 2, 8) and bool((counts.sum(-1) == 4 * 16 * 2).all())
    assert len(history.aux_loss) == 20 and min(history.aux_loss) > 0
    assert (max(history.dropped) > 0) == (dispatch == "capacity")


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(top_k=9), "top_k", "allowed: 1..n_routed_experts = 8"),
    (dict(n_group=3), "n_group", "allowed: 1, 2, 4, 8"),
    (dict(n_group=4, topk_group=5), "topk_group", "allowed: 1..n_group = 4"),
    (dict(n_group=4, topk_group=1, top_k=3), "top_k", "only topk_group · n_routed_experts / n_group = 2"),
    (dict(aux_loss_coef=-0.01), "aux_loss_coef", "a number in [0, inf)"),
    (dict(bias_update_speed=-1e-3), "bias_update_speed", "a number in [0, inf)"),
    (dict(router="relu"), "router", "allowed: 'softmax', 'sigmoid'"),
    (dict(dispatch="einsum"), "dispatch", "allowed: 'loop', 'sorted', 'grouped', 'capacity'"),
    (dict(capacity_factor=0.0), "capacity_factor", "a number in (0, inf)"),
    (dict(first_k_dense=4), "first_k_dense", "allowed: 0..n_layer = 3"),
    (dict(n_routed_experts=-1), "n_routed_experts", "an integer >= 0"),
])
def test_bad_moe_field_is_named(kwargs, field, allowed):
    with pytest.raises(ConfigError) as err:
        moe_config(**kwargs)
    assert f"ModelConfig.{field} = " in str(err.value) and allowed in str(err.value)


def test_router_bias_and_counts_keep_their_precision_in_bfloat16():
    layer = MoE(moe_config(router="sigmoid", bias_update_speed=0.001)).to(torch.bfloat16)
    assert layer.router.bias.dtype == torch.float32 and layer.step_counts.dtype == torch.long
    layer.router.bias.fill_(0.5)
    layer.train()
    layer(torch.randn(2, 8, 32, dtype=torch.bfloat16))
    layer.after_step()
    moved = (layer.router.bias - 0.5).abs()
    assert bool(((moved - 0.001).abs() < 1e-6).any())  # ±γ survives; in bfloat16, 0.5 ± 0.001 rounds to 0.5


def test_capacity_drops_only_in_training_because_it_is_not_causal():
    layer = MoE(moe_config(dispatch="capacity", capacity_factor=1.0))  # 4 tokens · top-2 / 8 experts: capacity 1
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(8, 32))       # expert e scores coordinate e of a token
    def tokens(last_first_choice):
        x = torch.zeros(1, 4, 32)
        for t, (first, second) in enumerate([(1, 0), (4, 5), (6, 7), (last_first_choice, 3)]):
            x[0, t, first], x[0, t, second] = 1.0, 0.9
        return x
    layer.train()
    a = layer(tokens(0))                                        # the last token's first choice: expert 0 ...
    dropped_a = layer.dropped
    b = layer(tokens(2))                                        # ... or expert 2
    # token 0's second choice is expert 0; the last token's first choice outranks it, so it is dropped in a.
    assert dropped_a > 0 and not torch.allclose(a[0, 0], b[0, 0])
    layer.eval()
    torch.testing.assert_close(layer(tokens(0))[0, :3], layer(tokens(2))[0, :3])  # evaluation runs dropless
    assert layer.dropped == 0.0


def test_an_empty_batch_passes_through():
    layer = MoE(moe_config(aux_loss_coef=0.01, seq_aux_coef=0.1))
    assert layer(torch.zeros(0, 8, 32)).shape == (0, 8, 32) and layer.aux_loss.item() == 0.0


def test_router_and_dispatch_names_match_the_config():
    from moelab.config import DISPATCHES, ROUTERS
    from moelab.dispatch import DROPLESS
    from moelab.moe import ROUTER_CLASSES
    assert tuple(ROUTER_CLASSES) == ROUTERS and tuple(DROPLESS) + ("capacity",) == DISPATCHES
