"""The course's fine-grained MoE trained with a multi-token-prediction module, then used to draft for speculative
decoding: the second token's acceptance rate and the decode speed-up, beside DeepSeek-V3's.

    MOELAB_THREADS=1 python -m moelab.experiments.mtp              # about 17 min on 1 CPU thread
    MOELAB_THREADS=1 python -m moelab.experiments.mtp --steps 100 --no-baseline   # a quick look
    MOELAB_THREADS=1 python -m moelab.experiments.mtp --fresh      # ignore the checkpoints in runs/mtp/

The model is notebook 04's fine-grained MoE (:func:`moelab.presets.course_fine_moe`) with DeepSeek-V3's MTP
(:mod:`moelab.mtp`): one module (``mtp_depth = 1``), loss weight λ = 0.3 (V3 §2.2 and §4.2). It trains on the
course corpus with seed 0 and :func:`moelab.experiments.moe_vs_dense.train_config` — the data, schedule and batch
order of notebook 04's runs — for ``--steps`` steps (default 1000, notebook 04's shorter budget; its committed model
had 4000). A *baseline*, the same MoE without MTP, trains alongside with the same seed: the same initial main-model
weights (:class:`moelab.model.Transformer` builds the MTP module with the random-number generator forked) and the
same batches, so the MTP gradient is the only difference. Checkpoints every 250 steps go to
``runs/mtp/<steps>/`` under the current folder; a rerun resumes from there.

Measured, into ``results/mtp.json`` beside this module (``--out`` writes elsewhere):

- the main model's validation loss with and without MTP (overall and by domain), beside the committed
  fine-grained runs of ``moe_vs_dense.json`` (trained with 2 threads: the last digits differ);
- the MTP module's own validation loss — token ``i + 2`` from position ``i`` — beside the main model's loss on the
  same tokens (from position ``i + 1``: the module reads the true token ``i + 1``, so both predict from the same
  context, the module with one block where the main model has ``n_layer``), and its *teacher-forced agreement*:
  how often its greedy guess equals the main model's greedy choice for the same token (the acceptance rate if
  every earlier token were the text's);
- greedy speculative decoding (:func:`moelab.speculative.speculative_decode`) of ``--prompts`` prompts per domain
  from the validation text, ``--new-tokens`` tokens each: drafts proposed and accepted (overall and by domain), checked
  token for token against :func:`moelab.decode.greedy_decode`; and tokens per second of both decoders, each prompt
  timed ``--repeats`` times, alternating, best time kept, in this process (same threads), with the time of one
  main-model pass of one and of two positions and of one draft, which predict the speed-up.

The trained MTP model goes to ``mtp_fine.pt`` beside the JSON (weights only, fp32). Both ship with the package.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import notebook
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import ModelConfig
from ..data import TextData, load_corpus
from ..decode import KVCache, forward_cached, greedy_decode
from ..model import Transformer, evaluating, parameter_counts
from ..mtp import depth_logits
from ..presets import course_fine_moe
from ..speculative import SpeculativeStats, draft, speculative_decode
from ..train import EVAL_SEED, History, domain_losses, model_from_state, train
from . import moe_vs_dense

RESULTS = Path(resources.files(__package__)) / "results" / "mtp.json"      # package data, committed
WEIGHTS = RESULTS.with_name("mtp_fine.pt")       # the trained MoE with its MTP module, weights only
RUNS = Path("runs") / "mtp"                      # checkpoints, relative to the current folder (not committed)
DEEPSEEK_V3 = {"acceptance": [0.85, 0.90], "speedup": 1.8,
               "source": "DeepSeek-V3 technical report §5.4.3 (arXiv:2412.19437)"}
PROMPT_TOKENS = 32


def mtp_config(depth: int = 1, weight: float = 0.3) -> ModelConfig:
    """The course's fine-grained MoE with ``depth`` MTP modules and loss weight ``weight`` (DeepSeek-V3: 1, 0.3)."""
    return dataclasses.replace(course_fine_moe(), mtp_depth=depth, mtp_loss_weight=weight)


def load_results(path: Path = RESULTS) -> dict:
    """The results :func:`main` committed at ``path``, as plain JSON."""
    return moe_vs_dense.load_results(path)


def load_trained(path: Path = WEIGHTS) -> Transformer:
    """The trained model with its MTP module whose weights :func:`main` committed at ``path``, in eval mode."""
    return model_from_state(load_checkpoint(path)).eval()


def curve(history: History) -> dict:
    """The loss curves of a run, rounded, as plain JSON (the MTP loss per step when there is one)."""
    return {"step": history.step, "train_loss": [round(v, 4) for v in history.loss],
            "mtp_loss": [round(v, 4) for v in history.mtp_loss], "eval_step": history.eval_step,
            "eval_val": [round(v, 4) for v in history.eval_val]}


def draft_quality(model: Transformer, data: TextData, domain: str | None = None, batch_size: int = 32,
                  n_batches: int = 8) -> dict[str, float]:
    """On the fixed validation batches of :func:`moelab.train.evaluate`, for the tokens ``2…T`` of each window: MTP
    module 1's loss (from position ``i``, given the true token ``i + 1``), the main model's loss (from position
    ``i + 1``) and how often the two greedy choices agree."""
    sums = dict.fromkeys(("loss", "main_loss", "agreement"), 0.0)
    with evaluating(model):
        for i in range(n_batches):
            x, y = data.batch("val", batch_size, model.config.block_size, EVAL_SEED + i, domain, balanced=True)
            logits, h = forward_cached(model, x, KVCache(model, batch_size), hidden=True)
            guess, main = depth_logits(model, h, y)[0], logits[:, 1:]               # (B, T − 1, vocab) each
            sums["loss"] += F.cross_entropy(guess.flatten(0, 1), y[:, 1:].flatten()).item()
            sums["main_loss"] += F.cross_entropy(main.flatten(0, 1), y[:, 1:].flatten()).item()
            sums["agreement"] += (guess.argmax(-1) == main.argmax(-1)).float().mean().item()
    return {k: v / n_batches for k, v in sums.items()}


def prompts(data: TextData, per_domain: int, length: int = PROMPT_TOKENS) -> dict[str, list[torch.Tensor]]:
    """``per_domain`` prompts ``(1, length)`` from each domain's validation text, starting at line starts spread
    evenly over it."""
    text, out = data.tokens["val"], {}
    newline = data.tokenizer.stoi["\n"]
    for domain, (start, end) in data.ranges["val"].items():
        starts = []
        for j in range(per_domain):
            at = start + j * (end - start - 2 * length) // per_domain
            breaks = (text[at:end - length] == newline).nonzero()
            starts.append(at + int(breaks[0]) + 1 if len(breaks) else at)
        out[domain] = [text[s:s + length][None] for s in starts]
    return out


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of ``repeats`` wall-clock timings of ``fn()``, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def pass_times(model: Transformer, prompt: torch.Tensor, repeats: int = 50) -> dict[str, float]:
    """Seconds of one cached main-model pass of one and of two new positions, and of one MTP draft, after
    ``prompt``: the parts a speculative step is made of."""
    T = prompt.shape[1]
    with evaluating(model):
        cache, draft_cache = KVCache(model, 1, T + 2), KVCache(model, 1, T + 2)
        draft_cache.layers = draft_cache.layers[:1]
        _, h = forward_cached(model, prompt, cache, hidden=True)

        def main_pass(n: int) -> None:
            cache.pos = T
            forward_cached(model, prompt[:, :n], cache)

        def draft_pass() -> None:
            draft_cache.pos = T - 1
            draft(model, h[:, -1:], prompt[:, -1:], draft_cache)

        return {"main_1": best_time(lambda: main_pass(1), repeats), "main_2": best_time(lambda: main_pass(2), repeats),
                "draft": best_time(draft_pass, repeats)}


def decode_benchmark(model: Transformer, data: TextData, per_domain: int, new_tokens: int, repeats: int) -> dict:
    """Speculative decoding against greedy decoding on :func:`prompts`: acceptance by domain, equality of the
    outputs, tokens per second of each (per prompt the best of ``repeats`` timings, the two decoders alternating)."""
    decoders = {"greedy": lambda p: greedy_decode(model, p, new_tokens),
                "speculative": lambda p: speculative_decode(model, p, new_tokens)}
    seconds, matches, by_domain, examples = dict.fromkeys(decoders, 0.0), True, {}, {}
    for domain, batch in prompts(data, per_domain).items():
        runs = [speculative_decode(model, prompt, new_tokens) for prompt in batch]
        matches &= all(torch.equal(out, greedy_decode(model, p, new_tokens)) for p, (out, _) in zip(batch, runs))
        total = SpeculativeStats(*map(sum, zip(*(dataclasses.astuple(stats) for _, stats in runs))))
        by_domain[domain] = {**dataclasses.asdict(total), "acceptance_rate": round(total.acceptance_rate, 4)}
        examples[domain] = {"prompt": data.tokenizer.decode(batch[0][0]),
                            "continuation": data.tokenizer.decode(runs[0][0][0, PROMPT_TOKENS:])}
        for prompt in batch:
            best = dict.fromkeys(decoders, float("inf"))
            for _ in range(repeats):
                for name, decode in decoders.items():
                    best[name] = min(best[name], best_time(lambda: decode(prompt), 1))
            for name in decoders:
                seconds[name] += best[name]
    total = {k: sum(d[k] for d in by_domain.values()) for k in ("proposed", "accepted", "forward_passes")}
    accept = total["accepted"] / total["proposed"]
    tokens_per_second = {k: round(len(data.domains) * per_domain * new_tokens / v, 1) for k, v in seconds.items()}
    times = pass_times(model, prompts(data, 1)[data.domains[0]][0])
    return {"prompts_per_domain": per_domain, "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens,
            "repeats": repeats, "matches_greedy": matches, **total, "acceptance_rate": round(accept, 4),
            "by_domain": by_domain, "tokens_per_second": tokens_per_second,
            "speedup": round(tokens_per_second["speculative"] / tokens_per_second["greedy"], 3),
            "seconds_per_pass": {k: round(v, 6) for k, v in times.items()},
            "predicted_speedup": round((1 + accept) * times["main_1"] / (times["main_2"] + times["draft"]), 3),
            "examples": examples}


def summarise(model: Transformer, history: History, data: TextData) -> dict:
    """A trained model's final validation loss, overall and by domain, its curves and training speed."""
    return {"final_val_loss": round(history.eval_val[-1], 4),
            "val_loss_by_domain": {d: round(v, 4) for d, v in domain_losses(model, data, 32, 8).items()},
            "tokens_per_second": round(history.tokens_per_second, 1), "train_seconds": round(history.seconds, 1),
            "curve": curve(history)}


def committed_fine() -> dict:
    """The fine-grained MoE's final validation losses committed in ``moe_vs_dense.json``, per budget (seed 0, and
    at the shorter budgets every seed)."""
    results = moe_vs_dense.load_results()
    out = {"threads": results["threads"]}
    for steps, budget in results["budgets"].items():
        seeds = budget.get("seeds", {}).get("models", {}).get("fine", {}).get("final_val_loss")
        out[steps] = {"final_val_loss": budget["models"]["fine"]["final_val_loss"], "seeds": seeds}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the course MoE with MTP; measure speculative decoding.")
    parser.add_argument("--steps", type=int, default=1000, help="training budget in optimizer steps")
    parser.add_argument("--no-baseline", action="store_true", help="skip the same model trained without MTP")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per domain for speculative decoding")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timings per prompt and decoder (the best is kept)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="results JSON; the trained model is written beside it (default: the package's)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="checkpoint folder (default: runs/mtp)")
    parser.add_argument("--fresh", action="store_true", help="delete the checkpoints and start over")
    args = parser.parse_args(argv)
    for name in ("steps", "prompts", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} is not allowed; allowed: 1 or more")
    if PROMPT_TOKENS + args.new_tokens - 1 > course_fine_moe().block_size:
        parser.error(f"--new-tokens {args.new_tokens} is not allowed; allowed: 1.."
                     f"{course_fine_moe().block_size - PROMPT_TOKENS + 1} (prompt and tokens fit block_size)")
    if args.fresh:
        shutil.rmtree(args.runs, ignore_errors=True)
    notebook.setup(seed=0)
    data = load_corpus()
    cfg = moe_vs_dense.train_config(args.steps)
    command = f"MOELAB_THREADS={torch.get_num_threads()} python -m moelab.experiments.mtp --steps {args.steps}"
    command += " --no-baseline" * args.no_baseline
    results = {"experiment": "mtp", "command": command, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "created": datetime.date.today().isoformat(),
               "domains": list(data.domains), "train_config": cfg.to_dict(), "deepseek_v3": DEEPSEEK_V3,
               "committed_fine": committed_fine()}
    runs = {"mtp": mtp_config()} | ({} if args.no_baseline else {"baseline": course_fine_moe()})
    models = {}
    for name, config in runs.items():
        notebook.setup(seed=0)                      # the same initial main-model weights for both
        models[name] = Transformer(config)
        history = train(models[name], data, cfg, checkpoint=args.runs / str(args.steps) / f"{name}.pt", resume=True)
        results[name] = {"config": config.to_dict(), **summarise(models[name], history, data)}
        print(f"{name}: val {results[name]['final_val_loss']:.4f}")
    model, started = models["mtp"].eval(), time.perf_counter()
    results["params"] = parameter_counts(model)
    quality = {d: draft_quality(model, data, d) for d in (None, *data.domains)}
    for key, name in (("mtp_val_loss", "loss"), ("main_val_loss_same_tokens", "main_loss"),
                      ("draft_agreement", "agreement")):
        results["mtp"][key] = round(quality[None][name], 4)
        results["mtp"][f"{key}_by_domain"] = {d: round(quality[d][name], 4) for d in data.domains}
    results["speculative"] = decode_benchmark(model, data, args.prompts, args.new_tokens, args.repeats)
    results["measure_seconds"] = round(time.perf_counter() - started, 1)     # after training (or loading it)
    moe_vs_dense.write_json(args.out, results)
    save_checkpoint(args.out.with_name(WEIGHTS.name), {"model_config": model.config.to_dict(),
                                                       "model": model.state_dict()})
    s = results["speculative"]
    print(f"MTP val loss {results['mtp']['mtp_val_loss']:.4f}; acceptance {s['acceptance_rate']:.1%}; "
          f"speed-up {s['speedup']:.2f}x; wrote {args.out}")


if __name__ == "__main__":
    main()
