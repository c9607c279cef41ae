"""Forward + backward time of each MoE dispatch path against a dense SwiGLU with the same active FLOPs.

    python benchmarks/moe_dispatch.py

Two shapes from issue #3, on the same 4096 tokens, 2 threads, fp32: *coarse* (d_model 256, E = 8, k = 2,
d_expert 512) and *fine-grained* (E = 64, k = 8, d_expert 128). Both activate 1024 expert columns per token, so
the dense baseline is a SwiGLU of width 1024. Each path runs moelab's MoE layer (softmax router, no shared
expert); all timings of one shape are interleaved round by round and the median is kept, so that a busy
machine slows every path alike. The fastest dropless path (loop, sorted, grouped: same outputs) is compared
with dense; capacity dispatch (capacity factor 1.25) is reported beside it (it would do less work if it
dropped tokens; with a freshly initialised, nearly uniform router it drops none). Where the time goes: each
stage of the grouped path (routing, sort, gather/scatter, the experts' grouped matmuls) is also timed alone,
with moelab's own functions, forward + backward. The allocator keeps freed memory
(moelab.bench.steady_allocator) for every path alike. Writes benchmarks/results/moe_dispatch.json and prints a
table.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moelab.bench import interleaved_medians, steady_allocator, target, write_result
from moelab.config import ModelConfig
from moelab.dispatch import assignments, combine, permute
from moelab.ffn import SwiGLU
from moelab.moe import MoE

SHAPES = {"coarse": dict(n_routed_experts=8, top_k=2, d_expert=512),
          "fine": dict(n_routed_experts=64, top_k=8, d_expert=128)}
TOKENS, D_MODEL, ROUNDS = 4096, 256, 15
TARGETS = {"coarse": 1.15, "fine": 1.35}
PATHS = ("loop", "sorted", "grouped", "capacity")
def step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        for p in (x, *module.parameters()):
            p.grad = None
        module(x).backward(grad)
    return run


def stages(moe: MoE, x: torch.Tensor, grad: torch.Tensor) -> dict[str, float]:
    """Median fwd + bwd milliseconds of each stage of the grouped path, timed alone with moelab's own functions:
    the router, the sort, the gather and the combine (scatter), and the experts' grouped SwiGLU."""
    E = moe.experts.n_experts
    rows = x.detach().reshape(-1, x.shape[-1]).requires_grad_()
    routing = moe.router(rows)
    token, expert, weight = assignments(routing)
    order, offsets = permute(token, expert, E)
    token = token[order]
    weight = weight[order].detach().requires_grad_()
    gathered = rows.index_select(0, token).detach().requires_grad_()
    out = moe.experts.grouped(gathered, offsets, weight).detach().requires_grad_()

    def route():
        r = moe.router(rows)
        r.weights.backward(torch.ones_like(r.weights))

    def gather_and_scatter():
        rows.index_select(0, token).backward(torch.ones_like(gathered))
        combine(rows, token, out).backward(grad.reshape(rows.shape))

    def experts():
        moe.experts.grouped(gathered, offsets, weight).backward(torch.ones_like(out))

    fns = {"routing": route, "sort and counts": lambda: permute(*assignments(routing)[:2], E),
           "gather / scatter": gather_and_scatter, "expert SwiGLU (grouped matmuls)": experts}
    return {k: round(v, 1) for k, v in interleaved_medians(fns, ROUNDS).items()}


def main() -> None:
    torch.set_num_threads(2)
    allocator = steady_allocator()
    rows, targets, profiles = [], [], {}
    for case, shape in SHAPES.items():
        torch.manual_seed(0)
        x = torch.randn(1, TOKENS, D_MODEL, requires_grad=True)
        grad = torch.randn(1, TOKENS, D_MODEL)
        modules = {"dense": SwiGLU(D_MODEL, shape["top_k"] * shape["d_expert"])}
        for path in PATHS:
            torch.manual_seed(1)
            modules[path] = MoE(ModelConfig(vocab_size=2, d_model=D_MODEL, n_head=4, dispatch=path, **shape))
        medians = interleaved_medians({name: step(m, x, grad) for name, m in modules.items()}, ROUNDS)
        dense = medians["dense"]
        for name, ms in medians.items():
            dropped = round(modules[name].dropped, 3) if name != "dense" else 0.0
            rows.append({"case": case, "impl": name, "fwd_bwd_ms": round(ms, 1), "dense_ms": round(dense, 1),
                         "ratio_to_dense": round(ms / dense, 3), "dropped_fraction": dropped, **shape,
                         "tokens": TOKENS, "d_model": D_MODEL})
        fastest = min(("loop", "sorted", "grouped"), key=medians.get)
        profiles[case] = {"grouped path, ms per fwd + bwd": medians["grouped"],
                          "its stages, each timed alone": stages(modules["grouped"], x, grad),
                          "dense SwiGLU": dense}
        targets.append(target(f"{case}: fastest dropless path ({fastest}) / dense", medians[fastest] / dense,
                              "<=", TARGETS[case]))
        targets.append(target(f"{case}: fastest dropless path / reference loop", medians[fastest] / medians["loop"],
                              "<", 1.0))
    print(f"{'case':7s} {'impl':9s} {'fwd+bwd ms':>10s} {'/ dense':>8s} {'dropped':>8s}")
    for r in rows:
        print(f"{r['case']:7s} {r['impl']:9s} {r['fwd_bwd_ms']:10.1f} {r['ratio_to_dense']:8.3f} "
              f"{r['dropped_fraction']:8.1%}")
    for case, p in profiles.items():
        print(f"{case}: grouped path {p['grouped path, ms per fwd + bwd']:.1f} ms; stages alone "
              f"{p['its stages, each timed alone']}; dense {p['dense SwiGLU']:.1f} ms")
    write_result("moe_dispatch", rows, targets, directory=Path(__file__).parent / "results", stages=profiles,
                 steady_allocator=allocator)


if __name__ == "__main__":
    main()
