"""A dense model against two MoEs with the same active parameters, trained on the same tokens.

    python -m moelab.experiments.moe_vs_dense                   # about 65 min on 2 CPU cores
    python -m moelab.experiments.moe_vs_dense --steps 100 200 --seeds 1   # a quick look
    python -m moelab.experiments.moe_vs_dense --fresh           # ignore the checkpoints in runs/moe_vs_dense/

The models (:func:`experiment_configs`): a dense SwiGLU model; a *coarse* MoE with 8 experts of half the dense
width, top-2 (Mixtral's shape); a *fine-grained* MoE with 31 routed experts of an eighth of the width, top-7,
plus one always-on shared expert (DeepSeekMoE's shape: experts a quarter of a coarse expert's width, one shared);
and a control, *wide*, a dense model as large as the fine-grained MoE with every parameter active. The MoEs
hold four times the dense FFN's parameters and use as many per token as the dense model (active parameters
agree within 0.2%). Both balance their load DeepSeek-V3's way (a sigmoid router with the aux-loss-free bias
and a small sequence-wise loss).

Every model is trained at each budget of ``--steps`` (default 1000 and 4000 steps: 4.6 and 18.2 passes over the
training text), each with its own learning-rate schedule, with a progress bar and a checkpoint every 250 steps in
``runs/moe_vs_dense/<steps>/`` under the current folder; a rerun resumes from there. At the shorter budgets the
matched models are repeated with ``--seeds`` seeds (default 3), to show how much of a difference is noise. The
results — curves, final and per-domain losses, parameter and FLOP counts, tokens/s, and for the longest budget the
MoEs' routing statistics — go to ``results/moe_vs_dense.json`` beside this module (``--out`` writes elsewhere),
and the fine-grained MoE of the longest budget to ``moe_vs_dense_fine.pt`` beside that. Both ship with the
package, so that notebooks/04_moe_vs_dense.ipynb loads them (:func:`load_results`, :func:`load_trained`) wherever
it runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
from importlib import resources
from pathlib import Path

import torch

from .. import notebook
from ..analysis import domain_expert_information, routing_by_domain, top_expert_per_token
from ..checkpoint import atomic_write, load_checkpoint, save_checkpoint
from ..config import ModelConfig
from ..data import TextData, load_corpus
from ..model import Transformer, flops_per_token, parameter_counts
from ..presets import COURSE_BASE, matched_configs
from ..train import History, TrainConfig, domain_losses, model_from_state, train

RESULTS = Path(resources.files(__package__)) / "results" / "moe_vs_dense.json"   # package data, committed
RUNS = Path("runs") / "moe_vs_dense"    # checkpoints, relative to the current folder (not committed)
WEIGHTS = RESULTS.with_name("moe_vs_dense_fine.pt")   # the trained fine-grained MoE, weights only (~3.4 MB)
LOAD_EVERY = 10                         # keep the expert load of every 10th step


def experiment_configs(vocab_size: int) -> dict[str, ModelConfig]:
    """:func:`matched_configs` and a control, ``wide``: a dense model whose single SwiGLU holds as many
    parameters as all the fine-grained MoE's experts, every one of them active (about 3× the FLOPs per token).
    It shows what the MoEs' stored parameters could buy if each token could use them all."""
    configs = matched_configs(vocab_size)
    fine = configs["fine"]
    total_ffn = (fine.n_routed_experts + fine.n_shared_experts) * 3 * fine.d_model * fine.d_expert
    return {**configs,
            "wide": ModelConfig(vocab_size=vocab_size, **COURSE_BASE, d_ff=round(total_ffn / (3 * fine.d_model)))}


def train_config(steps: int, seed: int = 0) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=min(100, steps // 10),
                       eval_interval=max(1, steps // 12), eval_batches=8, checkpoint_interval=250, seed=seed)


def summarise(name: str, model: Transformer, history: History, data: TextData, routing: bool) -> dict:
    """Everything the notebook shows about one trained model, as plain JSON; with ``routing``, an MoE's routing
    statistics too (by domain, load over training, example sentences)."""
    counts = parameter_counts(model)
    out = {"config": model.config.to_dict(), "total_params": counts["total"], "active_params": counts["active"],
           "flops_per_token": flops_per_token(model), "tokens_per_second": round(history.tokens_per_second, 1),
           "final_train_loss": round(history.eval_train[-1], 4), "final_val_loss": round(history.eval_val[-1], 4),
           "val_loss_by_domain": {d: round(v, 4) for d, v in domain_losses(model, data, 32, 8).items()},
           "curve": {"step": history.step, "train_loss": [round(v, 4) for v in history.loss],
                     "tokens_per_step": history.tokens_per_step, "eval_step": history.eval_step,
                     "eval_train": [round(v, 4) for v in history.eval_train],
                     "eval_val": [round(v, 4) for v in history.eval_val]},
           "routing": None}
    if routing and model.moe_layers:
        fractions = routing_by_domain(model, data, n_batches=4)
        examples = {}
        for domain in data.domains:
            a, b = data.ranges["val"][domain]
            text = data.tokenizer.decode(data.tokens["val"][a:b][:400]).strip("\n")
            text = "\n".join(text.split("\n")[:3])[:model.config.block_size]
            examples[domain] = {"text": text, "top_expert": top_expert_per_token(model, data.tokenizer, text).tolist()}
        out["routing"] = {
            "domain_expert_fraction": fractions.round(4).tolist(),
            "domain_expert_information_bits": domain_expert_information(fractions).round(4).tolist(),
            "load_steps": history.step[::LOAD_EVERY], "load": history.expert_counts[::LOAD_EVERY],
            "examples": examples}
    print(f"{name}: {counts['total']:,d} parameters, {counts['active']:,d} active, val {out['final_val_loss']:.4f}")
    return out


SEEDED = ("dense", "coarse", "fine")    # the matched models, repeated with more seeds at the shorter budgets


def repeat_with_seeds(names: list[str], configs: dict[str, ModelConfig], steps: int, seeds: range,
                      data: TextData, runs: Path) -> dict:
    """Final validation losses (overall and per domain) of each model trained with every seed in ``seeds``:
    seed ``s`` sets the initial weights and the batch order, the same for every model, so the models can be
    compared seed by seed. Seed 0 is the main run (its checkpoint is ``runs/<name>.pt``)."""
    out = {"seeds": list(seeds), "models": {}}
    for name in names:
        losses, by_domain = [], {d: [] for d in data.domains}
        for seed in seeds:
            notebook.setup(seed=seed)
            model = Transformer(configs[name])
            path = runs / (f"{name}.pt" if seed == 0 else f"{name}-seed{seed}.pt")
            history = train(model, data, train_config(steps, seed), checkpoint=path, resume=True)
            losses.append(round(history.eval_val[-1], 4))
            for d, v in domain_losses(model, data, 32, 8).items():
                by_domain[d].append(round(v, 4))
        out["models"][name] = {"final_val_loss": losses, "val_loss_by_domain": by_domain}
    return out


def load_results(path: Path = RESULTS) -> dict:
    """The results :func:`main` committed at ``path``, as plain JSON (read by notebooks/04_moe_vs_dense.ipynb)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_trained(path: Path = WEIGHTS) -> Transformer:
    """The trained model whose weights :func:`main` committed at ``path``, in eval mode."""
    return model_from_state(load_checkpoint(path)).eval()


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, atomically (:func:`moelab.train.atomic_write`)."""
    atomic_write(path, lambda f: f.write((json.dumps(payload, indent=1) + "\n").encode("utf-8")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train dense vs MoE at equal active parameters.")
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 4000],
                        help="training budgets in optimizer steps; each trains every model from scratch")
    parser.add_argument("--models", default="dense,coarse,fine,wide",
                        help="comma-separated subset of dense,coarse,fine,wide")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="results JSON; the fine-grained model is written beside it (default: the package's)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="checkpoint folder (default: runs/moe_vs_dense)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds (initialisation and batch order) for the matched models at the shorter budgets")
    parser.add_argument("--fresh", action="store_true", help="delete the checkpoints and start over")
    args = parser.parse_args(argv)
    notebook.setup(seed=0)
    data = load_corpus()
    configs = experiment_configs(data.tokenizer.vocab_size)
    names = args.models.split(",")
    unknown = set(names) - set(configs)
    if unknown:
        parser.error(f"--models {', '.join(sorted(unknown))} is not allowed; allowed: {', '.join(configs)}")
    if min(args.steps) < 1:
        parser.error(f"--steps {min(args.steps)} is not allowed; allowed: positive step counts")
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds} is not allowed; allowed: 1 or more")
    if args.fresh:
        shutil.rmtree(args.runs, ignore_errors=True)
    budgets = sorted(set(args.steps))
    command = "python -m moelab.experiments.moe_vs_dense --steps " + " ".join(map(str, budgets))
    if names != ["dense", "coarse", "fine", "wide"]:
        command += f" --models {args.models}"
    if args.seeds != 3:
        command += f" --seeds {args.seeds}"
    results = {"experiment": "moe_vs_dense", "command": command, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "created": datetime.date.today().isoformat(),
               "domains": list(data.domains), "budgets": {}}
    for steps in budgets:
        cfg = train_config(steps)
        budget = results["budgets"][str(steps)] = {"train_config": cfg.to_dict(), "models": {}}
        for name in names:
            notebook.setup(seed=0)                                               # same init seed for every model
            model = Transformer(configs[name])
            history = train(model, data, cfg, checkpoint=args.runs / str(steps) / f"{name}.pt", resume=True)
            budget["models"][name] = summarise(name, model, history, data, routing=steps == budgets[-1])
            write_json(args.out, results)
            if name == "fine" and steps == budgets[-1]:
                save_checkpoint(args.out.with_name(WEIGHTS.name),
                                {"model_config": model.config.to_dict(), "model": model.state_dict()})
        if steps != budgets[-1] and args.seeds > 1:
            budget["seeds"] = repeat_with_seeds(
                [n for n in names if n in SEEDED], configs, steps, range(args.seeds), data, args.runs / str(steps))
            write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
