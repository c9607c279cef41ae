"""Does the race's model have outlier channels, and what does each FP8 recipe lose on its real activations?

    python benchmarks/fp8_outliers.py     # 10 s; a minute more to train the fp32 race model if runs/ lacks it

The fp32 run of benchmarks/fp8_training.py (seed 0, 300 steps; :func:`moelab.experiments.fp8_training.run_one`
resumes it from runs/fp8_training/ or trains it) is run on 8 validation batches with a hook on every
``nn.Linear`` the recipes convert: attention's four projections and the shared expert's three (its gate and up
projections see the MoE layer's input, as the routed experts do; its down projection the SwiGLU's hidden values,
as theirs do). For each GEMM input: how far its largest channel stands above the typical one (the largest
channel's amax over the median channel's amax), and the relative error of the forward product ``x Wᵀ`` with
``x`` and ``W`` in FP8 E4M3 under each recipe's scales (:func:`moelab.mixed_precision.gemm`), against fp32.
Outlier channels made by hand, as LLM activations at scale have them (Dettmers et al. 2022), are the FP8-training
notebook's section 4. Writes benchmarks/results/fp8_outliers.json.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moelab import notebook
from moelab.bench import write_result
from moelab.data import load_corpus
from moelab.experiments.fp8_training import CHECKPOINTS, run_one
from moelab.mixed_precision import gemm
from moelab.train import load_training_state, model_from_state

RECIPES = ("fine", "rowwise", "tensorwise")


def gemm_inputs(model: torch.nn.Module, data, batches: int = 8) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, input rows, weight (N, K)) of every converted ``nn.Linear``, on ``batches`` validation batches."""
    captured: dict[str, list[torch.Tensor]] = {}
    weights: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "output" not in name and "router" not in name:
            weights[name] = module.weight.detach()
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: captured.setdefault(name, []).append(args[0].detach().flatten(0, -2))))
    with torch.no_grad():
        for b in range(batches):
            x, _ = data.batch("val", 16, model.config.block_size, seed=10_000 + b)
            model(x)
    for h in hooks:
        h.remove()
    return [(name, torch.cat(rows), weights[name]) for name, rows in captured.items()]


def forward_error(x: torch.Tensor, w: torch.Tensor, recipe: str) -> float:
    exact = x @ w.t()
    return float((gemm(x, "activation", w, "weight", recipe, "forward") - exact).norm() / exact.norm())


def main() -> None:
    notebook.setup(seed=0, threads=2)
    data = load_corpus()
    run_one("fp32", 0, 300, data, progress=True)              # resumes, or trains it (about a minute)
    model = model_from_state(load_training_state(CHECKPOINTS / "fp32_300_s0.pt")).eval()
    rows = []
    for name, x, w in gemm_inputs(model, data):
        amax = x.abs().amax(dim=0)
        row = {"kind": "model", "gemm": name, "tokens": x.shape[0], "K": x.shape[1], "N": w.shape[0],
               "largest_over_median_channel": float(amax.max() / amax.median())}
        row.update({f"error_{r}": forward_error(x, w, r) for r in RECIPES})
        rows.append(row)
        print(f"{name:32s} largest/median channel {row['largest_over_median_channel']:6.1f}  "
              + "  ".join(f"{r} {row[f'error_{r}']:.4f}" for r in RECIPES))
    write_result("fp8_outliers", rows, [], directory=Path(__file__).parent / "results")


if __name__ == "__main__":
    main()
