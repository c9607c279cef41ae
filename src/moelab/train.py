"""Training loop: AdamW, linear warmup + cosine decay, gradient clipping, periodic evaluation, checkpoints.

Checkpoints are written atomically and read without running pickled code (:mod:`moelab.checkpoint`). A resumed
run continues exactly as an uninterrupted one would, bit for bit on CPU: the batches are a function of the step
(see :mod:`moelab.data`), the learning rate is a function of the step, and the checkpoint holds the optimizer state
and the torch RNG state (for dropout).
Built in notebooks/01_dense_baseline.ipynb.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, ModelConfig, check, check_float, check_int, from_dict, set_checked
from .data import CharTokenizer, TextData
from .dp import average_gradients, sum_expert_loads
from .model import Transformer, evaluating
from .notebook import progress_bar
from .timeline import Timeline

EVAL_SEED = 10**9  # evaluation batches use seeds EVAL_SEED + i: the same windows for every model and run


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Defaults suit the course's small character-level models on a 2-core CPU.

    ``min_lr = None`` means ``lr / 10``, the floor of the cosine decay.
    """

    max_steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float | None = None
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_batches: int = 8
    checkpoint_interval: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("max_steps", "batch_size", "eval_interval", "eval_batches"):
            set_checked(self, name, check_int(owner, name, getattr(self, name)))
        for name in ("warmup_steps", "checkpoint_interval", "seed"):
            set_checked(self, name, check_int(owner, name, getattr(self, name), minimum=0))
        check(self.warmup_steps <= self.max_steps, owner, "warmup_steps", self.warmup_steps,
              f"allowed: 0..max_steps = {self.max_steps}")
        set_checked(self, "lr", check_float(owner, "lr", self.lr, 0.0, 1.0, low_open=True))
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        set_checked(self, "min_lr", check_float(owner, "min_lr", min_lr, 0.0, self.lr))
        set_checked(self, "weight_decay", check_float(owner, "weight_decay", self.weight_decay, 0.0, 1.0))
        for name in ("beta1", "beta2"):
            set_checked(self, name, check_float(owner, name, getattr(self, name), 0.0, 1.0, high_open=True))
        set_checked(self, "grad_clip", check_float(owner, "grad_clip", self.grad_clip, 0.0, math.inf,
                                                   high_open=True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps`` (Goyal et al. 2017), then cosine decay to ``min_lr``
    at ``max_steps`` (Loshchilov & Hutter 2017, SGDR without restarts)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019); weight decay on matrices only, not on norm gains (as in nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def evaluate(model: Transformer, data: TextData, split: str, batch_size: int, n_batches: int,
             domain: str | None = None) -> float:
    """Mean loss over ``n_batches`` fixed batches of ``split``, in eval mode.

    Without ``domain`` the batches are balanced over the domains (see :meth:`TextData.batch`), so that train
    and val estimates weigh the domains alike; with ``domain`` they come from that domain only.
    """
    losses = []
    with evaluating(model):
        for i in range(n_batches):
            x, y = data.batch(split, batch_size, model.config.block_size, EVAL_SEED + i, domain, balanced=True)
            losses.append(model(x.to(model.device), y.to(model.device))[1].item())
    return sum(losses) / len(losses)


def domain_losses(model: Transformer, data: TextData, batch_size: int = 16, n_batches: int = 4,
                  split: str = "val") -> dict[str, float]:
    """Loss on each domain of ``data`` separately (fixed batches, eval mode)."""
    return {d: evaluate(model, data, split, batch_size, n_batches, domain=d) for d in data.domains}


@dataclass
class History:
    """What a run recorded: per-step training loss and learning rate, and periodic train/val evaluations
    (``eval_train`` and ``eval_val``, on fixed batches, at the steps in ``eval_step``).

    For a model with MoE layers, also per step: the balancing loss added to the training loss (``aux_loss``),
    how many of the batch's token-to-expert assignments chose each expert of each MoE layer, before any
    capacity drop (``expert_counts[step][layer][expert]``), and the fraction of assignments dropped by capacity
    dispatch, averaged over layers (``dropped``). For a model with multi-token prediction, also per step the MTP loss
    added to the training loss (``mtp_loss``, :func:`moelab.mtp.mtp_loss`).
    """

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_train: list[float] = field(default_factory=list)
    eval_val: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    expert_counts: list[list[list[int]]] = field(default_factory=list)
    dropped: list[float] = field(default_factory=list)
    mtp_loss: list[float] = field(default_factory=list)
    tokens_per_step: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "History":
        return from_dict(cls, values)

    @property
    def tokens_per_second(self) -> float:
        return len(self.step) * self.tokens_per_step / self.seconds if self.seconds else float("nan")


def train_step(model: Transformer, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, grad_clip: float,
               *, data_parallel: bool = False, group: dist.ProcessGroup | None = None,
               all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, replicas: int | None = None,
               timeline: Timeline | None = None,
               forward: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the batch ``(x, y)``: language-modelling loss plus the MoE balancing losses and the
    multi-token-prediction loss (:attr:`~moelab.model.Transformer.mtp_loss`, zero without MTP), backward, gradient
    clipping (if ``grad_clip > 0``), the optimizer, then the MoE bias updates. Returns the first two losses
    (detached).

    The same step trains in one process, data-parallel and data + expert parallel. With ``data_parallel`` (implied
    when the MoE layers are expert-parallel, or an ``all_reduce`` is given), ``(x, y)`` is this rank's share of the
    batch: the gradients are averaged over the ranks of ``group`` before clipping
    (:func:`moelab.dp.average_gradients`, which takes ``all_reduce``, ``replicas`` and ``timeline``) and the expert
    loads summed before the bias update (:func:`moelab.dp.sum_expert_loads`). ``forward`` runs the forward pass in
    ``model``'s place when it wraps it, as torch's ``DistributedDataParallel`` does, whose hooks then average the
    gradients during backward themselves."""
    sharded = [i for i, moe in enumerate(model.moe_layers) if moe.expert_parallel]
    if sharded and len(sharded) != len(model.moe_layers):
        raise ValueError(f"MoE layers {sharded} (counting MoE layers from 0) are expert-parallel and the others are "
                         f"not; allowed: every MoE layer sharded with moelab.ep.shard, or none")
    _, loss = (forward or model)(x.to(model.device), y.to(model.device))
    aux = model.aux_loss
    opt.zero_grad(set_to_none=True)
    (loss + aux + model.mtp_loss).backward()
    if data_parallel or sharded or all_reduce is not None:
        average_gradients(model, grad_clip, group=group, all_reduce=all_reduce, replicas=replicas,
                          timeline=timeline)
        sum_expert_loads(model, group)
    elif grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    model.after_step()
    return loss.detach(), aux.detach()


CHECKPOINT_KEYS = ("model_config", "train_config", "step", "model", "optimizer", "history", "rng", "tokenizer")


def load_training_state(path: str | Path) -> dict[str, Any]:
    """:func:`load_checkpoint`, and check that it is a checkpoint written by :func:`train`."""
    state = load_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a moelab training checkpoint: it lacks {', '.join(missing)}")
    return state


def model_from_state(state: dict[str, Any]) -> Transformer:
    """The model a checkpoint's ``model_config`` describes, with its ``model`` weights loaded."""
    model = Transformer(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model


def restore(path: str | Path) -> tuple[Transformer, CharTokenizer, History]:
    """Rebuild the model, its tokenizer and its training history from a checkpoint written by :func:`train`."""
    state = load_training_state(path)
    model = model_from_state(state)
    return model, CharTokenizer(state["tokenizer"]), History.from_dict(state["history"])


# TrainConfig fields that decide only when things are logged or saved: a resumed run may change them.
LOGGING_FIELDS = ("eval_interval", "checkpoint_interval")


def _resume(path: Path, model: Transformer, opt: torch.optim.Optimizer, cfg: TrainConfig,
            data: TextData) -> tuple[int, History]:
    state = load_training_state(path)
    current = {"model_config": model.config.to_dict(),
               "train_config": {k: v for k, v in cfg.to_dict().items() if k not in LOGGING_FIELDS}}
    stored = {"model_config": ModelConfig.from_dict(state["model_config"]).to_dict(),   # fields added since: defaults
              "train_config": from_dict(TrainConfig, state["train_config"]).to_dict()}
    for key, fields in current.items():
        for name, value in fields.items():
            if stored[key][name] != value:
                raise ConfigError(f"cannot resume from {path}: its {key} has {name} = {stored[key][name]!r}, "
                                  f"this run has {value!r}; allowed: the same value, or a new checkpoint path")
    if state["tokenizer"] != data.tokenizer.chars:
        raise ConfigError(f"cannot resume from {path}: it was trained with a different tokenizer "
                          f"({len(state['tokenizer'])} characters; this data has {data.tokenizer.vocab_size}); "
                          f"allowed: the same data, or a new checkpoint path")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], History.from_dict(state["history"])


def train(model: Transformer, data: TextData, cfg: TrainConfig, checkpoint: str | Path | None = None,
          resume: bool = False, progress: bool = True) -> History:
    """Train ``model`` on ``data`` for ``cfg.max_steps`` steps and return the :class:`History`.

    With ``checkpoint``, the state is saved there every ``cfg.checkpoint_interval`` steps (if > 0) and at the
    end. With ``resume=True``, training continues exactly from that checkpoint if the file exists, and starts
    from step 0 if it does not (so a script can simply be restarted after a crash). Batches are moved to the
    model's device, so the same loop trains on a GPU.
    Progress is a ``tqdm.auto`` bar (see :func:`moelab.notebook.progress_bar`).
    """
    if data.tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"ModelConfig.vocab_size = {model.config.vocab_size} is smaller than the data's "
                          f"vocabulary of {data.tokenizer.vocab_size} characters; allowed: "
                          f"vocab_size >= data.tokenizer.vocab_size")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=<path of the checkpoint to continue from>")
    opt = make_optimizer(model, cfg)
    block = model.config.block_size
    start, history = 0, History(tokens_per_step=cfg.batch_size * block)
    if resume and Path(checkpoint).exists():
        start, history = _resume(Path(checkpoint), model, opt, cfg, data)

    def save(step: int) -> None:
        save_checkpoint(checkpoint, {
            "model_config": model.config.to_dict(), "train_config": cfg.to_dict(), "step": step,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "history": history.to_dict(),
            "rng": torch.get_rng_state(), "tokenizer": data.tokenizer.chars,
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})

    def record_eval(step: int) -> None:
        history.eval_step.append(step)
        history.eval_train.append(evaluate(model, data, "train", cfg.batch_size, cfg.eval_batches))
        history.eval_val.append(evaluate(model, data, "val", cfg.batch_size, cfg.eval_batches))

    model.train()
    bar = progress_bar(progress, total=cfg.max_steps, initial=start, desc="train")
    for step in range(start, cfg.max_steps):
        if step % cfg.eval_interval == 0 and step not in history.eval_step:
            record_eval(step)
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = data.batch("train", cfg.batch_size, block, seed=cfg.seed * 10**6 + step)
        loss, aux = train_step(model, opt, x, y, cfg.grad_clip)
        history.seconds += time.perf_counter() - t0
        history.step.append(step)
        history.loss.append(loss.item())
        history.lr.append(lr)
        if model.moe_layers:
            history.aux_loss.append(aux.item())
            history.expert_counts.append([moe.counts.tolist() for moe in model.moe_layers])
            history.dropped.append(sum(moe.dropped for moe in model.moe_layers) / len(model.moe_layers))
        if model.config.mtp_depth:
            history.mtp_loss.append(model.mtp_loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{history.loss[-1]:.3f}", val=f"{history.eval_val[-1]:.3f}")
        if checkpoint is not None and cfg.checkpoint_interval and (step + 1) % cfg.checkpoint_interval == 0:
            save(step + 1)
    bar.close()
    if cfg.max_steps not in history.eval_step:
        record_eval(cfg.max_steps)
    if checkpoint is not None:
        save(cfg.max_steps)
    return history
