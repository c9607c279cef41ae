"""Training in 8 bits against fp32 and against torchao, and why FP8 GEMMs promote their partial sums.

    python benchmarks/fp8_training.py            # about 20 min on 2 CPU cores; resumes from runs/fp8_training/
    python benchmarks/fp8_training.py --steps 20 # a quick look (not written to results/)

1. The race (moelab.experiments.fp8_training): one MoE (d_model 256, experts 256 wide) trained from the same
   weights on the same batches in fp32, moelab's recipes (DeepSeek-V3's fine-grained, rowwise, tensorwise, INT8)
   and torchao's float8 training (tensorwise, rowwise). Target: the fine-grained FP8 run's final validation loss
   within 0.5% of fp32's, mean over two seeds.
2. One layer, like for like: moelab's tensorwise recipe (E5M2 output gradients) against torchao's tensorwise
   recipe on a 256 → 512 linear layer: output, input gradient and weight gradient. Both quantise the same
   operands with the same per-tensor scales and sum exact FP8 products in fp32, so they may differ only by the
   order of fp32 additions: target ≤ 1e-5 of the largest value. The rowwise recipes are reported beside it
   (torchao rounds its rowwise scales to powers of two, moelab does not).
3. Accumulation (moelab.accumulation): the largest relative error of FP8 dot products summed in an accumulator
   with 14 significant bits, without and with promotion to fp32 every 128 products, for K = 128 … 4096.
   Target: at K = 4096 the error without promotion ≥ 5× the error with it.
Writes benchmarks/results/fp8_training.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from moelab import notebook
from moelab.accumulation import ROUNDINGS, accumulation_error
from moelab.bench import target, write_result
from moelab.experiments.fp8_training import RUNS, SEEDS, one_layer, race

K_VALUES = (128, 512, 1024, 2048, 4096)
AGREEMENT_TOLERANCE = 1e-5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    notebook.setup(seed=0, threads=2)
    rows = [dict(kind="race", **r) for r in race(args.steps)]
    fp32 = {r["seed"]: r["val_loss"] for r in rows if r["run"] == "fp32"}        # fp32 runs every seed
    finals = {run: [r["val_loss"] for r in rows if r["run"] == run] for run in RUNS}
    mean = {run: sum(v) / len(v) for run, v in finals.items()}
    for r in rows:
        r["val_vs_fp32"] = r["val_loss"] / fp32[r["seed"]] - 1
        print(f"{r['run']:20s} seed {r['seed']}  val {r['val_loss']:.4f}  vs fp32 {r['val_vs_fp32']:+.2%}")
    rows += [one_layer(recipe) for recipe in ("tensorwise", "rowwise")]
    for K in K_VALUES:
        for rounding in ROUNDINGS:
            rows.append({"kind": "accumulation", "K": K, "bits": 14, "rounding": rounding,
                         "without_promotion": accumulation_error(K, 14, None, rounding),
                         "promoted_every_128": accumulation_error(K, 14, 128, rounding)})
    k4096 = next(r for r in rows if r["kind"] == "accumulation" and r["K"] == 4096 and r["rounding"] == "toward_zero")
    tensorwise = next(r for r in rows if r["kind"] == "one_layer" and r["recipe"] == "tensorwise")
    agreement = max(tensorwise[f"{n}_max_diff"] for n in ("output", "input_grad", "weight_grad"))
    targets = [
        target("FP8 fine-grained final val loss within 0.5% of fp32 (mean over seeds, relative)",
               abs(mean["fine"] / mean["fp32"] - 1), "<=", 0.005),
        target("accumulation at K = 4096: error without promotion / with promotion every 128",
               k4096["without_promotion"] / k4096["promoted_every_128"], ">=", 5),
        target("moelab tensorwise vs torchao tensorwise on one layer: largest difference / largest value",
               agreement, "<=", AGREEMENT_TOLERANCE),
    ]
    if args.steps != 300:
        print("--steps differs from the default: results not written")
        return
    write_result("fp8_training", rows, targets, directory=Path(__file__).parent / "results", seeds=list(SEEDS),
                 mean_val_loss=mean)


if __name__ == "__main__":
    main()
