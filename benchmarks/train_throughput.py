"""Training tokens per second of the MoE models against the dense model with the same active parameters.

    python benchmarks/train_throughput.py

The three models of notebooks/04_moe_vs_dense.ipynb (moelab.experiments.moe_vs_dense.matched_configs), each
taking full training steps (forward, balancing losses, backward, clipping, AdamW, bias update) on the same
batches of the course corpus, 2 threads; the steps of the three models are interleaved round by round and the
median kept. Target (issue #4): the coarse MoE reaches at least 0.7 of the dense model's tokens/s. Writes
benchmarks/results/train_throughput.json and prints a table.
"""
from __future__ import annotations

from pathlib import Path

from moelab import notebook
from moelab.bench import interleaved_medians, steady_allocator, target, write_result
from moelab.data import load_corpus
from moelab.experiments.moe_vs_dense import BASE, matched_configs, train_config
from moelab.model import Transformer, parameter_counts
from moelab.train import make_optimizer, train_step

ROUNDS = 40


def main() -> None:
    notebook.setup(seed=0, threads=2)
    allocator = steady_allocator()
    data = load_corpus()
    cfg = train_config(steps=1000)
    batches = [data.batch("train", cfg.batch_size, BASE["block_size"], seed) for seed in range(ROUNDS + 2)]
    steps, models = {}, {}
    for name, config in matched_configs(data.tokenizer.vocab_size).items():
        model = models[name] = Transformer(config)
        opt = make_optimizer(model, cfg)
        feed = iter(batches * 2)
        steps[name] = lambda model=model, opt=opt, feed=feed: train_step(model, opt, *next(feed), cfg.grad_clip)
    medians = interleaved_medians(steps, ROUNDS)
    tokens = cfg.batch_size * BASE["block_size"]
    rows = []
    for name, ms in medians.items():
        counts = parameter_counts(models[name])
        rows.append({"model": name, "step_ms": round(ms, 1), "tokens_per_second": round(tokens / ms * 1e3),
                     "relative_to_dense": round(medians["dense"] / ms, 3), **counts})
        print(f"{name:7s} {ms:7.1f} ms/step  {tokens / ms * 1e3:8,.0f} tokens/s  {medians['dense'] / ms:5.2f}× dense"
              f"  ({counts['active']:,d} of {counts['total']:,d} parameters active)")
    targets = [target("coarse MoE tokens/s / dense tokens/s", medians["dense"] / medians["coarse"], ">=", 0.7)]
    write_result("train_throughput", rows, targets, directory=Path(__file__).parent / "results", batch_tokens=tokens,
                 steady_allocator=allocator)


if __name__ == "__main__":
    main()
