"""Serving under the memory-bandwidth limit: cached decoding measured against the bytes it reads.

    python benchmarks/serving.py          # about 2 minutes on 2 cores

1. **The decode roofline.** This machine's memory bandwidth (STREAM-like copy, triad and read,
   :func:`moelab.roofline.stream`) and matmul throughput; then cached decode steps of an MoE (32 experts of 1024,
   top-4, d_model 2048, 2 layers: 1.7 GB in fp32, far beyond the caches; dispatched "sorted", which runs only the
   experts that received tokens) and of the two dense models it is compared with, of equal active and equal total
   FFN width, at batch 1 … 256 with 64 cached positions. The fastest of 9 steps (STREAM's convention: the best of
   its runs) is set against the roofline ``max(bytes / read bandwidth, FLOPs / matmul rate)``, the MoE's bytes
   counted with the experts its steps actually touched (and, beside it, the uniform-routing expectation).
2. **MLA absorption.** A DeepSeek-like MLA model (16 heads, latent 256 + RoPE 32) decoded naively (every head's
   keys and values cached) and absorbed (the latent only): the same logits, and the cache bytes and time per step
   of each at batch 8 with 1024 cached positions.
3. **Into the ecosystem.** The course's trained MoE exported (:mod:`moelab.hf_export`) and loaded by
   ``transformers``: the largest logit difference.
4. **Multi-token prediction.** Restated from the committed run of ``python -m moelab.experiments.mtp`` (about 17
   minutes; ``src/moelab/experiments/results/mtp.json``), not measured again: the second token's acceptance and the
   speed-up of speculative over greedy decoding, with the committed model.

Models run in float32 on one torch thread. This torch's CPU matrix-vector products (a batch-1 step's every
matmul) run on one thread whatever the setting — measured here 12–18 GB/s at one and at two threads alike, while
two threads double STREAM's bandwidth — so the bandwidth a decode step can use is one core's: the machine is
measured at both settings, and decoding and its model use one. Writes benchmarks/results/serving.json.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from moelab.bench import target, write_result
from moelab.config import ModelConfig
from moelab.decode import KVCache, forward_cached
from moelab.experiments import mtp
from moelab.experiments.moe_vs_dense import load_trained
from moelab.hf_export import export
from moelab.model import Transformer
from moelab.roofline import (
    decode_step_bytes,
    decode_step_flops,
    expected_distinct_experts,
    matched_decoders,
    matmul_flops,
    measure_decode,
    roofline_seconds,
    stream,
)

RESULTS = Path(__file__).parent / "results"
SHAPE = dict(d_model=2048, n_layer=2, n_experts=32, top_k=4, d_expert=1024)
SHARED = dict(vocab_size=256, block_size=96, n_head=16, n_kv_head=4)
BATCHES, CONTEXT, STEPS = (1, 4, 16, 64, 256), 64, 9
MLA = ModelConfig(vocab_size=256, block_size=1040, n_layer=2, n_head=16, d_model=1024, d_ff=1024, attention="mla",
                  q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                  norm_eps=1e-6)
MLA_BATCH, MLA_CONTEXT = 8, 1024


def roofline_rows(bandwidth: float, flop_rate: float) -> list[dict]:
    rows = []
    for name, config in matched_decoders(**SHAPE, **SHARED).items():
        torch.manual_seed(0)
        model = Transformer(config).eval()
        total = decode_step_bytes(model, 10**9, 0)["weights"] + decode_step_bytes(model, 10**9, 0)["experts"]
        for batch in BATCHES:
            measured = measure_decode(model, batch, CONTEXT, STEPS)
            context = CONTEXT + STEPS // 2
            read = decode_step_bytes(model, batch, context, measured["distinct_experts"])
            flops = decode_step_flops(model, batch, context)
            predicted = roofline_seconds(read["total"], flops, bandwidth, flop_rate)
            rows.append({"case": "roofline", "model": name, "batch": batch, "ms": 1e3 * measured["seconds"],
                         "model_ms": 1e3 * predicted, "bandwidth_ms": 1e3 * read["total"] / bandwidth,
                         "compute_ms": 1e3 * flops / flop_rate, "measured_over_model": measured["seconds"] / predicted,
                         "tokens_per_s": batch / measured["seconds"], "bytes_read": read["total"],
                         "weight_bytes_total": total, "distinct_experts": measured["distinct_experts"],
                         "distinct_experts_uniform": (expected_distinct_experts(SHAPE["n_experts"], SHAPE["top_k"],
                                                                                batch) if model.moe_layers else None)})
            print(f"{name:20s} batch {batch:3d}: {rows[-1]['ms']:8.1f} ms, model {rows[-1]['model_ms']:8.1f} ms, "
                  f"{rows[-1]['tokens_per_s']:8.0f} tokens/s")
        del model
    return rows


def mla_rows() -> list[dict]:
    torch.manual_seed(0)
    model = Transformer(MLA).eval()
    ids = torch.randint(0, MLA.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    logits = {}
    for absorb in (False, True):
        cache = KVCache(model, 2, 40, absorb)
        logits[absorb] = torch.cat([forward_cached(model, ids[:, :32], cache)]
                                   + [forward_cached(model, ids[:, t:t + 1], cache) for t in range(32, 40)], 1)
    difference = ((logits[True] - logits[False]).abs().max() / logits[False].abs().max()).item()
    rows = []
    for absorb in (False, True):
        measured = measure_decode(model, MLA_BATCH, MLA_CONTEXT, STEPS, absorb=absorb)
        cache = KVCache(model, 1, 1, absorb)
        forward_cached(model, ids[:1, :1], cache)
        rows.append({"case": "mla", "attention": "absorbed" if absorb else "naive", "batch": MLA_BATCH,
                     "context": MLA_CONTEXT, "ms": 1e3 * measured["seconds"],
                     "cache_bytes_per_token": cache.nbytes(), "max_relative_logit_difference": difference})
        print(f"MLA {rows[-1]['attention']:8s}: {rows[-1]['ms']:7.1f} ms per step, "
              f"{cache.nbytes():,} cache bytes per token (all layers)")
    return rows


def export_row() -> dict:
    from transformers import AutoModelForCausalLM

    model = load_trained()
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as directory, torch.no_grad():
        export(model, directory)
        architecture = json.loads((Path(directory) / "config.json").read_text())["architectures"][0]
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
        difference = (hf(ids).logits - model(ids)[0]).abs().max().item()
    print(f"exported as {architecture}: largest logit difference {difference:.2e}")
    return {"case": "export", "architecture": architecture, "max_abs_logit_difference": difference}


def mtp_row() -> dict:
    spec = mtp.load_results()["speculative"]
    keys = ("acceptance_rate", "speedup", "predicted_speedup", "matches_greedy", "tokens_per_second", "by_domain")
    return {"case": "mtp", "source": "src/moelab/experiments/results/mtp.json", **{k: spec[k] for k in keys}}


def main() -> None:
    start = time.perf_counter()
    rows = []
    for threads in (2, 1):                     # the last setting stays: decode runs on one thread (see above)
        torch.set_num_threads(threads)
        bandwidth, flop_rate = stream(), matmul_flops(2048)
        rows.append({"case": "machine", "threads": threads, "matmul_flops": flop_rate,
                     **{f"{k}_bytes_per_s": v for k, v in bandwidth.items()}})
        print(f"{threads} threads: bandwidth (GB/s) " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bandwidth.items())
              + f"; matmul {flop_rate / 1e9:.0f} GFLOP/s")
    rows += roofline_rows(bandwidth["read"], flop_rate) + mla_rows() + [export_row(), mtp_row()]
    at1 = {r["model"]: r for r in rows if r["case"] == "roofline" and r["batch"] == 1}
    moe, dense_total = at1["MoE"], at1["dense, equal total"]
    naive, absorbed = [r for r in rows if r["case"] == "mla"]
    targets = [target(f"batch-1 decode step off the bandwidth model, {name}", abs(r["measured_over_model"] - 1),
                      "<=", 0.25) for name, r in at1.items()]
    targets[0]["why"] = ("beyond its bytes, the MoE's step routes its token and runs 4 experts' 12 small "
                         "matrix-vector products where the dense model of equal active width runs 3 large ones: "
                         "about 2-3 ms more at this size (the dense model's step is within 20%), and the bandwidth "
                         "measured moves by about 5% from one run to the next")
    targets += [
        target("batch 1: (MoE tokens/s / dense-equal-total tokens/s) / (total bytes / MoE bytes)",
               (moe["tokens_per_s"] / dense_total["tokens_per_s"]) / (moe["weight_bytes_total"] / moe["bytes_read"]),
               ">=", 0.7),
        target("absorbed MLA logits vs naive, max relative difference (in 1e-6)",
               1e6 * naive["max_relative_logit_difference"], "<=", 10),
        target("MLA cache bytes per token, naive / absorbed", naive["cache_bytes_per_token"]
               / absorbed["cache_bytes_per_token"], ">", 1.0),
        target("exported checkpoint in transformers, max |logit difference| (in 1e-6)",
               1e6 * rows[-2]["max_abs_logit_difference"], "<=", 100),
        target("MTP draft of the 2nd token accepted, committed model (DeepSeek-V3: 0.85-0.90)",
               rows[-1]["acceptance_rate"], ">=", 0.85),
        target("MTP speculative decoding, tokens/s over greedy decoding's, committed model", rows[-1]["speedup"],
               ">", 1.0),
    ]
    write_result("serving", rows, targets, directory=RESULTS, seconds=round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    main()
