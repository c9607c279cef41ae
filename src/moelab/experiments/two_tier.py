"""The settings notebooks 10 and 14 share: training data-parallel on an emulated two-tier network."""
from __future__ import annotations

from dataclasses import dataclass

from .. import train
from ..config import check, check_float, check_int
from ..network import FAST, SLOW, Link, Topology


@dataclass(frozen=True)
class TwoTierRun:
    """Training on an emulated two-tier network, as notebooks 10 and 14 run it: ``steps`` optimizer steps at
    ``batch_size`` sequences per rank per step, the inner AdamW schedule of :class:`~moelab.train.TrainConfig`
    (``lr``, warmup over ``warmup_steps``), ``H`` inner steps per outer step, DiLoCo's outer Nesterov SGD
    (``outer_lr``, ``outer_momentum``: OpenDiLoCo's lr 0.7, but momentum 0.5, not its 0.9, which needs more than
    the 4–10 outer steps of these runs to settle and ends them at a worse loss), the validation loss every
    ``eval_every`` steps (a multiple of ``H``, so that the local methods have a global model to evaluate), and the
    network: ``nodes`` × ``per_node`` ranks, ``intra`` links in a node, ``inter`` links between nodes."""

    steps: int = 100
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 10
    H: int = 25
    outer_lr: float = 0.7
    outer_momentum: float = 0.5
    eval_every: int = 25
    eval_batches: int = 8
    nodes: int = 2
    per_node: int = 2
    intra: Link = FAST
    inter: Link = SLOW
    seed: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("steps", "batch_size", "H", "eval_every", "eval_batches", "nodes", "per_node"):
            check_int(owner, name, getattr(self, name))
        for name in ("warmup_steps", "seed"):
            check_int(owner, name, getattr(self, name), minimum=0)
        check_float(owner, "outer_lr", self.outer_lr, 0.0, 10.0, low_open=True)
        check_float(owner, "outer_momentum", self.outer_momentum, 0.0, 1.0, high_open=True)
        check(self.eval_every % self.H == 0, owner, "eval_every", self.eval_every,
              f"allowed: a multiple of H = {self.H}")
        check(self.steps % self.eval_every == 0, owner, "steps", self.steps,
              f"allowed: a multiple of eval_every = {self.eval_every}")
        self.train_config()                             # and the inner optimizer's settings are checked there

    @property
    def world_size(self) -> int:
        return self.nodes * self.per_node

    @property
    def topology(self) -> Topology:
        return Topology(self.nodes, self.per_node)

    def train_config(self) -> train.TrainConfig:
        """The inner (or only) optimizer's settings."""
        return train.TrainConfig(max_steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                                 warmup_steps=self.warmup_steps, eval_batches=self.eval_batches, seed=self.seed)
