"""8-bit matmuls and 8-bit dispatch payloads against fp32 and bf16, on this CPU.

    python benchmarks/quant.py

1. Square GEMMs (M = N = K from 256 to 2048): fp32 and bf16 ``torch.matmul`` against the INT8 product of
   ``torch._int_mm`` (int8 × int8 → int32), interleaved round by round, medians, 2 threads; the JSON records
   which path moelab.quant.int8_mm takes here (the kernel, or its exact float64 emulation where that is faster).
   The raw products: quantising the operands is not timed (weights are quantised once; W8A8 pays for its
   activations on every call). The JSON records torch's CPU capability (the vector instructions it uses).
   Target (issue #7): INT8 at least 1.8× the fp32 matmul's speed at 1024×1024×1024.
2. The bytes of a dispatch payload per token row (DeepSeek-V3's hidden size 7168 and our layer's 256) in FP8 with
   one fp32 scale per 128 values, packed as moelab.collectives sends it (moelab.quant.pack), against fp32 and bf16.
   Targets: ≤ 0.27× fp32 and ≤ 0.53× bf16.
3. The validation loss of the trained course model (notebook 04's fine-grained MoE,
   src/moelab/experiments/results/moe_vs_dense_fine.pt) with its routed experts in each scheme of moelab.qexperts,
   on the same fixed batches.
   Target: FP8 fine-grained (1×128 activation tiles, 128×128 weight blocks) within 1% of fp32, relative.
Writes benchmarks/results/quant.json.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moelab import notebook
from moelab.bench import interleaved_medians, steady_allocator, target, write_result
from moelab.data import load_corpus
from moelab.experiments.moe_vs_dense import load_trained
from moelab.qexperts import SCHEMES, quantized_copy
from moelab.quant import int8_kernel_faster, int8_mm, int8_mm_available, pack, quantize
from moelab.train import evaluate

SIZES = [256, 512, 1024, 2048]
ROUNDS = {256: 40, 512: 20, 1024: 10, 2048: 4}


def int8_kernel(a: torch.Tensor, b: torch.Tensor):
    """The int8 product to time: ``torch._int_mm`` itself where it runs (not the path int8_mm would pick), else
    int8_mm's exact emulation."""
    return (lambda: torch._int_mm(a, b.t())) if int8_mm_available() else (lambda: int8_mm(a, b))


def main() -> None:
    notebook.setup(seed=0, threads=2)
    allocator = steady_allocator()
    rows = []
    for n in SIZES:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a16, b16 = a.bfloat16(), b.bfloat16()
        a8, b8 = torch.randint(-127, 128, (n, n), dtype=torch.int8), torch.randint(-127, 128, (n, n), dtype=torch.int8)
        ms = interleaved_medians({"fp32": lambda: a @ b.t(), "bf16": lambda: a16 @ b16.t(),
                                  "int8": int8_kernel(a8, b8)}, ROUNDS[n])
        for dtype, t in ms.items():
            rows.append({"kind": "gemm", "size": n, "dtype": dtype, "ms": round(t, 3),
                         "gflops": round(2 * n**3 / t / 1e6, 1), "speed_vs_fp32": round(ms["fp32"] / t, 3)})
        print(f"{n:5d}³  fp32 {ms['fp32']:8.2f} ms  bf16 {ms['bf16']:8.2f} ms ({ms['fp32'] / ms['bf16']:.2f}×)  "
              f"int8 {ms['int8']:8.2f} ms ({ms['fp32'] / ms['int8']:.2f}×)")
    for d in (256, 7168):
        q, scales = quantize(torch.randn(1, d), "fp8_e4m3", 128)
        wire = pack(q, scales).numel()
        rows.append({"kind": "payload", "d_model": d, "fp8_bytes": wire, "fp32_bytes": 4 * d, "bf16_bytes": 2 * d,
                     "vs_fp32": round(wire / (4 * d), 4), "vs_bf16": round(wire / (2 * d), 4)})
        print(f"d_model {d}: FP8 + scales {wire} B per row = {wire / (4 * d):.4f}× fp32, {wire / (2 * d):.4f}× bf16")
    data, model = load_corpus(), load_trained()
    losses = {}
    for scheme in SCHEMES:
        quantized = quantized_copy(model, scheme)
        losses[scheme] = evaluate(quantized, data, "val", batch_size=32, n_batches=16)
        stored = sum(moe.experts.stored_bytes for moe in quantized.moe_layers)
        rows.append({"kind": "val_loss", "scheme": scheme, "val_loss": round(losses[scheme], 6),
                     "relative_increase": round(losses[scheme] / losses["fp32"] - 1, 6), "expert_bytes": stored})
        print(f"{scheme:13s} val loss {losses[scheme]:.5f} ({losses[scheme] / losses['fp32'] - 1:+.4%}), "
              f"routed experts stored in {stored:,d} B")
    speed = next(r["speed_vs_fp32"] for r in rows if r.get("size") == 1024 and r.get("dtype") == "int8")
    capability = torch.backends.cpu.get_cpu_capability()
    payload = next(r for r in rows if r.get("d_model") == 7168)
    targets = [target("int8 GEMM speed / fp32 at 1024x1024x1024", speed, ">=", 1.8),
               target("FP8 dispatch bytes with scales / fp32", payload["vs_fp32"], "<=", 0.27),
               target("FP8 dispatch bytes with scales / bf16", payload["vs_bf16"], "<=", 0.53),
               target("FP8 fine-grained val loss / fp32 val loss - 1 (course model)",
                      losses["fp8_fine"] / losses["fp32"] - 1, "<", 0.01)]
    if not targets[0]["met"]:
        targets[0]["why"] = (f"torch's CPU int8 GEMM has no fast kernel for this CPU ({capability} kernels): the "
                             "target was met (3-4x) on an AVX-512 CPU with int8 dot-product instructions, and "
                             "moelab.quant.int8_mm takes its float64 emulation here")
    write_result("quant", rows, targets, directory=Path(__file__).parent / "results", int_mm=int8_mm_available(),
                 int8_mm_path="torch._int_mm" if int8_kernel_faster() else "float64 emulation",
                 steady_allocator=allocator, cpu_capability=capability)


if __name__ == "__main__":
    main()
