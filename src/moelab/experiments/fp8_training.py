"""The 8-bit training race: one MoE trained from the same weights on the same batches in fp32 and in 8-bit recipes.

    python -m moelab.experiments.fp8_training              # every run
    python -m moelab.experiments.fp8_training --steps 20   # a quick look

The model (:func:`race_config`) is wide enough for the recipes to differ: ``d_model = 256`` and experts 256 wide,
so a weight holds 2×2 blocks of 128×128 and an activation row two 1×128 tiles (the course model, 64 wide, has one
tile per row and every recipe collapses to per-row scales). Runs (:data:`RUNS`): fp32; moelab's recipes of
:mod:`moelab.mixed_precision` (DeepSeek-V3's ``fine``, ``rowwise``, ``tensorwise`` with E5M2 output gradients as
torchao's, ``int8``); and torchao's float8 training (``convert_to_float8_training``) with its ``tensorwise`` and
``rowwise`` recipes. torchao converts ``nn.Linear`` layers only: the stacked experts stay in fp32 there (its MoE
training path is a CUDA grouped GEMM), while moelab's recipes convert them too. Every run uses torch's AdamW with
fp32 moments, so that only the GEMMs differ. fp32 and ``fine`` run with :data:`SEEDS` seeds.

Each run checkpoints to ``runs/fp8_training/`` under the current folder every 50 steps and resumes from there
(:func:`moelab.train.train`); the curves go to the JSON :func:`race` returns.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import time
from pathlib import Path
from types import ModuleType

import torch

from ..config import ModelConfig
from ..data import TextData, load_corpus
from ..mixed_precision import Linear8, convert
from ..model import Transformer
from ..presets import BALANCE
from ..train import TrainConfig, train

RUNS = ("fp32", "fine", "rowwise", "tensorwise", "int8", "torchao_tensorwise", "torchao_rowwise")
SEEDS = (0, 1)                              # for fp32 and fine, the comparison the target is about
CHECKPOINTS = Path("runs") / "fp8_training"


def race_config(vocab_size: int) -> ModelConfig:
    """Two layers, ``d_model`` 256, 8 routed experts 256 wide (top-2) and one shared, DeepSeek-V3's balancing."""
    return ModelConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=256,
                       n_routed_experts=8, top_k=2, d_expert=256, n_shared_experts=1, **BALANCE)


def train_config(steps: int, seed: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=16, lr=2e-3, warmup_steps=min(20, steps), eval_interval=50,
                       eval_batches=8, checkpoint_interval=50, seed=seed)


def grad_format(recipe: str) -> str:
    """The output gradient's format of a moelab recipe here: E5M2 for ``tensorwise`` (torchao's tensorwise recipe,
    which it is compared with), E4M3 otherwise (DeepSeek-V3)."""
    return "fp8_e5m2" if recipe == "tensorwise" else "fp8_e4m3"


def import_torchao() -> ModuleType:
    """``torchao``, imported without the warnings it prints on a CPU: CUDA kernel libraries it cannot load there,
    and a notice from torch's pytree registry (via logging). Nothing else is silenced."""
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import torchao
    finally:
        pytree.setLevel(level)
    return torchao


def torchao_convert(model: torch.nn.Module, recipe: str) -> torch.nn.Module:
    """torchao's float8 training on every ``nn.Linear`` but the output head (kept in fp32, as in moelab's)."""
    import_torchao()
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    return convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                                      module_filter_fn=lambda module, fqn: fqn != "output")


def one_layer(recipe: str) -> dict:
    """moelab's ``recipe`` against torchao's recipe of the same name on one 256 → 512 linear layer: for the output,
    the input gradient and the weight gradient, the largest difference relative to the largest value
    (``*_max_diff``), and each one's relative error against fp32."""
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 512, bias=False)
    x0, dy = torch.randn(256, 256), torch.randn(256, 512)

    def run(layer: torch.nn.Module) -> list[torch.Tensor]:
        x = x0.clone().requires_grad_()
        layer(x).backward(dy)
        return [layer(x0).detach(), x.grad, layer.weight.grad]

    ours = Linear8(256, 512, recipe, grad_format(recipe))
    ours.load_state_dict(base.state_dict())
    theirs = torchao_convert(torch.nn.Sequential(copy.deepcopy(base)), recipe)[0]
    exact = run(copy.deepcopy(base))
    row = {"kind": "one_layer", "recipe": recipe}
    for name, a, b, e in zip(("output", "input_grad", "weight_grad"), run(ours), run(theirs), exact):
        row[f"{name}_max_diff"] = float((a - b).abs().max() / b.abs().max())
        row[f"{name}_moelab_vs_fp32"] = float((a - e).norm() / e.norm())
        row[f"{name}_torchao_vs_fp32"] = float((b - e).norm() / e.norm())
    return row


def build(run: str, seed: int, vocab_size: int) -> Transformer:
    """The run's model: the same fp32 weights for every run of a seed, then converted to its recipe."""
    if run not in RUNS:
        raise ValueError(f"run = {run!r} is not allowed; allowed: {', '.join(RUNS)}")
    torch.manual_seed(seed)
    model = Transformer(race_config(vocab_size))
    if run.startswith("torchao_"):
        return torchao_convert(model, run.removeprefix("torchao_"))
    if run != "fp32":
        convert(model, run, grad_format=grad_format(run))
    return model


def run_one(run: str, seed: int, steps: int, data: TextData, progress: bool = True) -> dict:
    """Train one run (resuming from its checkpoint) and return its curve and timing."""
    model = build(run, seed, data.tokenizer.vocab_size)
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    history = train(model, data, train_config(steps, seed), checkpoint=CHECKPOINTS / f"{run}_{steps}_s{seed}.pt",
                    resume=True, progress=progress)
    return {"run": run, "seed": seed, "steps": steps, "val_loss": history.eval_val[-1],
            "eval_step": history.eval_step, "eval_val": history.eval_val,
            "seconds_this_call": round(time.perf_counter() - start, 1)}


def race(steps: int = 300, runs: tuple[str, ...] = RUNS, seeds: tuple[int, ...] = SEEDS) -> list[dict]:
    """Every run of :data:`RUNS` (fp32 and ``fine`` with each of ``seeds``, the others with the first)."""
    data = load_corpus()
    return [run_one(run, seed, steps, data) for run in runs
            for seed in (seeds if run in ("fp32", "fine") else seeds[:1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    print(json.dumps([{k: v for k, v in r.items() if k not in ("eval_step", "eval_val")} for r in race(args.steps)],
                     indent=1))


if __name__ == "__main__":
    main()
