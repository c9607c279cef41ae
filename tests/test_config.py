"""Config validation: every bad field raises a ConfigError naming the field and what is allowed."""
import dataclasses

import numpy as np
import pytest

from moelab.config import ConfigError, ModelConfig, swiglu_hidden
from moelab.train import TrainConfig


def test_defaults_are_resolved():
    cfg = ModelConfig(vocab_size=50, d_model=96, n_head=6)
    assert cfg.n_kv_head == 6 and cfg.head_dim == 16
    assert cfg.d_ff == swiglu_hidden(96) == 256  # int(8 * 96 / 3) = 256, already a multiple of 32


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(vocab_size=0), "vocab_size", "an integer >= 1"),
    (dict(n_layer=-2), "n_layer", "an integer >= 1"),
    (dict(block_size=True), "block_size", "an integer >= 1"),
    (dict(block_size=64.0), "block_size", "an integer >= 1"),
    (dict(d_model=128, n_head=3), "n_head", "allowed: 1, 2, 4, 8, 16, 32, 64"),
    (dict(d_model=96, n_head=96), "n_head", "even head_dim"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head", "allowed: 1, 2, 4"),
    (dict(d_ff=0), "d_ff", "an integer >= 1"),
    (dict(dropout=1.0), "dropout", "[0, 1)"),
    (dict(dropout=float("nan")), "dropout", "[0, 1)"),
    (dict(rope_theta=0.5), "rope_theta", "a number in (1, inf)"),
    (dict(rope_theta=float("inf")), "rope_theta", "a number in (1, inf)"),
    (dict(norm_eps=0.0), "norm_eps", "a number in (0, 1]"),
    (dict(d_model=33, n_head=1), "d_model", "an even number"),
    (dict(d_model=5040, n_head=11), "n_head", "allowed: 1, 2, 3, 4, 5, 6, 7, 8, …"),
    (dict(tie_embeddings="yes"), "tie_embeddings", "True or False"),
    (dict(init_std=-0.1), "init_std", "[0, 1]"),
])
def test_bad_model_field_is_named(kwargs, field, allowed):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**{"vocab_size": 10, **kwargs})
    assert f"ModelConfig.{field} = " in str(err.value)
    assert allowed in str(err.value)


def test_replace_revalidates():
    cfg = ModelConfig(vocab_size=10)
    with pytest.raises(ConfigError, match="ModelConfig.n_kv_head = 3"):
        dataclasses.replace(cfg, n_kv_head=3)


def test_round_trip_and_unknown_field():
    cfg = ModelConfig(vocab_size=10, n_kv_head=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="no field 'n_embd'; allowed fields: vocab_size, block_size"):
        ModelConfig.from_dict({"vocab_size": 10, "n_embd": 64})


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_steps=0), "max_steps"),
    (dict(warmup_steps=20, max_steps=10), "warmup_steps"),
    (dict(lr=0.0), "lr"),
    (dict(lr=1e-3, min_lr=1e-2), "min_lr"),
    (dict(beta2=1.0), "beta2"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(checkpoint_interval=-1), "checkpoint_interval"),
    (dict(batch_size=2.5), "batch_size"),
])
def test_bad_train_field_is_named(kwargs, field):
    with pytest.raises(ConfigError, match=rf"TrainConfig\.{field} = .* is not allowed; allowed: "):
        TrainConfig(**kwargs)


def test_numpy_integers_are_accepted_and_stored_as_int():
    cfg = ModelConfig(vocab_size=np.int64(50), n_layer=np.int32(2))
    assert cfg.vocab_size == 50 and type(cfg.vocab_size) is int and type(cfg.n_layer) is int


def test_min_lr_defaults_to_a_tenth_of_lr():
    assert TrainConfig(lr=1e-4).min_lr == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match=r"TrainConfig.lr = -1 is not allowed; allowed: a number in \(0, 1\]"):
        TrainConfig(lr=-1)
