"""Training: schedule, exact resume, atomic checkpoints, weights-only loading."""
import math

import pytest
import torch

from moelab.config import ConfigError, ModelConfig
from moelab.data import build
from moelab.model import Transformer
from moelab.train import (
    History,
    TrainConfig,
    domain_losses,
    evaluate,
    load_checkpoint,
    lr_at,
    restore,
    save_checkpoint,
    train,
)


@pytest.fixture(scope="module")
def data():
    return build({"abc": "the cat sat on the mat.\n" * 60, "num": "12+30=42\n" * 120})


MOE = dict(n_routed_experts=4, top_k=2, d_expert=16, n_shared_experts=1, router="sigmoid", bias_update_speed=0.01,
           aux_loss_coef=0.01)


def model_for(data, seed=0, dropout=0.1, **moe):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=data.tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2,
                                   d_model=32, dropout=dropout, **moe))


CFG = TrainConfig(max_steps=12, batch_size=4, warmup_steps=3, eval_interval=4, eval_batches=2,
                  checkpoint_interval=5)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(max_steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(1e-4) and lrs[55] == pytest.approx(5.5e-4)


def test_training_lowers_the_loss(data):
    history = train(model_for(data, dropout=0.0), data, TrainConfig(max_steps=60, batch_size=8, warmup_steps=5,
                                                                    eval_interval=20, eval_batches=2),
                    progress=False)
    assert history.eval_step == [0, 20, 40, 60]
    assert history.eval_val[-1] < 0.5 * history.eval_val[0]
    assert len(history.loss) == 60 and history.tokens_per_step == 8 * 16


class Interrupt(Exception):
    pass


def train_until_crash(data, cfg, ckpt, crash_step, monkeypatch, **moe):
    """Train with checkpoints, raising at the batch of ``crash_step`` as a killed process would stop."""
    original_batch = type(data).batch

    def batch(self, split, batch_size, block_size, seed, *args, **kwargs):
        if split == "train" and seed == crash_step:
            raise Interrupt
        return original_batch(self, split, batch_size, block_size, seed, *args, **kwargs)

    monkeypatch.setattr(type(data), "batch", batch)
    with pytest.raises(Interrupt):
        train(model_for(data, **moe), data, cfg, checkpoint=ckpt, progress=False)
    monkeypatch.undo()


@pytest.mark.parametrize("moe", [{}, MOE], ids=["dense", "moe"])
def test_resume_continues_exactly_as_an_uninterrupted_run(data, tmp_path, monkeypatch, moe):
    full = model_for(data, **moe)
    expected = train(full, data, CFG, progress=False)

    ckpt = tmp_path / "run.pt"
    train_until_crash(data, CFG, ckpt, crash_step=8, monkeypatch=monkeypatch, **moe)
    assert load_checkpoint(ckpt)["step"] == 5

    torch.manual_seed(123)  # a different RNG state: the checkpoint must restore the one dropout needs
    resumed_model = model_for(data, seed=99, **moe)
    resumed = train(resumed_model, data, CFG, checkpoint=ckpt, resume=True, progress=False)
    assert resumed.loss == expected.loss  # bit for bit
    assert resumed.eval_step == expected.eval_step and resumed.eval_val == expected.eval_val
    assert resumed.expert_counts == expected.expert_counts and resumed.aux_loss == expected.aux_loss
    for (name, p), q in zip(full.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(p, q), name


def test_resume_may_change_only_when_things_are_logged(data, tmp_path, monkeypatch):
    ckpt = tmp_path / "run.pt"
    train_until_crash(data, CFG, ckpt, crash_step=7, monkeypatch=monkeypatch)
    more_often = TrainConfig(**{**CFG.to_dict(), "eval_interval": 3, "checkpoint_interval": 2})
    resumed = train(model_for(data), data, more_often, checkpoint=ckpt, resume=True, progress=False)
    assert resumed.loss == train(model_for(data), data, CFG, progress=False).loss


def test_resume_reads_a_checkpoint_written_before_a_config_field_existed(data, tmp_path, monkeypatch):
    ckpt = tmp_path / "run.pt"
    train_until_crash(data, CFG, ckpt, crash_step=7, monkeypatch=monkeypatch)
    state = load_checkpoint(ckpt)
    for name in ("mtp_depth", "mtp_loss_weight"):          # fields with defaults, added after such checkpoints
        del state["model_config"][name]
    save_checkpoint(ckpt, state)
    resumed = train(model_for(data), data, CFG, checkpoint=ckpt, resume=True, progress=False)
    assert resumed.loss == train(model_for(data), data, CFG, progress=False).loss


def test_resume_refuses_a_different_config_or_tokenizer(data, tmp_path):
    ckpt = tmp_path / "run.pt"
    train(model_for(data), data, CFG, checkpoint=ckpt, progress=False)
    other = TrainConfig(**{**CFG.to_dict(), "lr": 1e-2})
    with pytest.raises(ConfigError, match="train_config has lr = 0.003, this run has 0.01"):
        train(model_for(data), data, other, checkpoint=ckpt, resume=True, progress=False)
    relabelled = build({"abc": "THE CAT SAT ON THE MAT.\n" * 60, "num": "12+30=42\n" * 120})
    with pytest.raises(ConfigError, match="trained with a different tokenizer"):
        train(model_for(data), relabelled, CFG, checkpoint=ckpt, resume=True, progress=False)
    with pytest.raises(ValueError, match="resume=True needs checkpoint="):
        train(model_for(data), data, CFG, resume=True, progress=False)


def test_a_model_smaller_than_the_vocabulary_is_refused(data):
    small = Transformer(ModelConfig(vocab_size=3, block_size=16, n_layer=1, n_head=2, d_model=16))
    with pytest.raises(ConfigError, match=r"ModelConfig.vocab_size = 3 is smaller than the data's vocabulary"):
        train(small, data, CFG, progress=False)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # and no temporary file is left


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_checkpoints_load_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": Payload()}, path)
    with pytest.raises(ValueError, match="holds pickled Python objects .* weights_only=True") as err:
        load_checkpoint(path)
    assert "weights_only=False" not in str(err.value)  # never advise the unsafe way out
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="torn.pt is not a readable checkpoint"):
        load_checkpoint(tmp_path / "torn.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt is not a moelab training checkpoint: it lacks model_config"):
        restore(tmp_path / "foreign.pt")


def test_restore_rebuilds_model_tokenizer_and_history(data, tmp_path):
    model = model_for(data, dropout=0.0)
    history = train(model, data, TrainConfig(max_steps=4, batch_size=2, warmup_steps=1, eval_interval=2,
                                             eval_batches=1), checkpoint=tmp_path / "m.pt", progress=False)
    again, tok, hist = restore(tmp_path / "m.pt")
    assert tok.chars == data.tokenizer.chars and hist.loss == history.loss
    assert evaluate(again, data, "val", 4, 2) == evaluate(model, data, "val", 4, 2)


def test_domain_losses_and_history_round_trip(data):
    losses = domain_losses(model_for(data), data, batch_size=2, n_batches=1)
    assert list(losses) == ["abc", "num"] and all(math.isfinite(v) for v in losses.values())
    h = History(step=[0], loss=[1.5], lr=[0.1], tokens_per_step=4, seconds=2.0)
    assert History.from_dict(h.to_dict()) == h and h.tokens_per_second == 2.0

