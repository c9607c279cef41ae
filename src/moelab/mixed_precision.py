"""Training with 8-bit GEMMs: every matmul of a linear layer's forward and backward on FP8 (or INT8) operands.

DeepSeek-V3's FP8 mixed precision framework (§3.3): the three GEMMs of a linear layer — forward ``y = x Wᵀ``, input
gradient (dgrad) ``dx = dy W`` and weight gradient (wgrad) ``dW = dyᵀ x`` — take 8-bit operands and accumulate in
fp32, while master weights, gradients and the optimizer stay in higher precision. What makes E4M3 (3 mantissa bits,
range ±448) usable everywhere is the scaling: one scale per small group *along each GEMM's reduction dimension*, so
that an outlier only coarsens its own group.

**Recipes** (:data:`RECIPES`), as operands ``a @ b.T`` with the reduction along the last dimension of both:

- ``"fine"``: DeepSeek-V3's. Activations and output gradients in 1×128 tiles (per token per 128 channels), weights
  in 128×128 blocks. In wgrad the reduction runs over tokens, so ``dy`` and ``x`` are tiled 128 tokens × 1 channel
  there: the tile direction switches with the GEMM.
- ``"rowwise"``: one scale per row of each operand along the reduction (per token, per output channel; torchao's
  "rowwise" recipe).
- ``"tensorwise"``: one scale per operand (torchao's default "tensorwise" recipe; Transformer Engine's delayed
  scaling without the delay).
- ``"int8"``: after SwitchBack (Wortsman et al. 2023): forward and dgrad in INT8 with per-row scales on both
  operands (SwitchBack scales weights per tensor), summed exactly (:func:`moelab.quant.int8_mm`: ``torch._int_mm``
  where it is the faster here), wgrad in fp32 (SwitchBack's is 16-bit), whose inner dimension — every token of the
  batch — is the long one that 8 bits would hurt.

**The GEMM path.** Operands are rounded to the 8-bit format's values with their scales
(:func:`moelab.quant.fake_quantize`, equal to casting to torch's FP8 dtypes and back, without the casts that on
a CPU cost more than the matmul) and multiplied in fp32: FP8 × FP8 products summed in fp32, what a tensor core
with fp32 promotion computes.
``torch._scaled_mm`` computes the same numbers for per-tensor and per-row scales, but on a CPU it can be three
orders of magnitude slower than fp32 (:func:`moelab.quant.scaled_mm` picks it on CUDA); the tests check the two
agree. Dimensions need not be multiples of 128: a partial tile or block is scaled by its own amax (zero padding
changes no amax). A non-finite value in an operand is refused with the GEMM and operand named.

:func:`convert` swaps a model's ``nn.Linear`` layers and stacked experts for 8-bit ones, leaving what DeepSeek-V3
keeps in higher precision: embedding, output head, router (MoE gating), norms and attention's softmax.
:class:`AdamW` keeps the two moments in BF16 (DeepSeek-V3) or fp32 beside fp32 master weights.

Shapes: ``x`` ``(M, K)`` rows in, weights ``(N, K)`` as ``nn.Linear`` stores them (experts store ``(K, N)``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ffn import Experts
from .quant import fake_quantize, int8_mm, quantize_blocks

RECIPES = ("fine", "rowwise", "tensorwise", "int8")
GRAD_FORMATS = ("fp8_e4m3", "fp8_e5m2")
TILE = 128      # DeepSeek-V3's tile and block edge


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"recipe = {recipe!r} is not allowed; allowed: {', '.join(map(repr, RECIPES))}")


def block_for(recipe: str, role: str, shape: tuple[int, int]) -> tuple[int, int]:
    """The scaling block of an operand ``(R, K)`` (reduction along ``K``) with ``role`` ``"weight"`` or
    ``"activation"`` (activations and gradients alike) under ``recipe``."""
    _check_recipe(recipe)
    if role not in ("weight", "activation"):
        raise ValueError(f"role = {role!r} is not allowed; allowed: 'weight', 'activation'")
    R, K = shape
    if recipe == "tensorwise":
        return (max(R, 1), max(K, 1))
    if recipe in ("rowwise", "int8"):
        return (1, max(K, 1))
    return (TILE, TILE) if role == "weight" else (1, TILE)


def _finite(t: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds inf or NaN; allowed: finite values (8-bit scales cannot represent them: "
                         f"lower the learning rate or look for the overflow upstream)")
    return t.detach().float()


def gemm(a: torch.Tensor, a_role: str, b: torch.Tensor, b_role: str, recipe: str, name: str,
         formats: tuple[str, str] = ("fp8_e4m3", "fp8_e4m3")) -> torch.Tensor:
    """``a @ b.T`` in fp32 from 8-bit operands in ``formats``, both scaled along the reduction (their last
    dimension); INT8 under the ``"int8"`` recipe, its products summed exactly (:func:`moelab.quant.int8_mm`)."""
    a = _finite(a, f"{name}'s {a_role} operand")
    b = _finite(b, f"{name}'s {b_role} operand")
    block_a, block_b = block_for(recipe, a_role, tuple(a.shape)), block_for(recipe, b_role, tuple(b.shape))
    if recipe == "int8":                                    # per-row scales: exact int32 sums, then rescale
        (qa, sa), (qb, sb) = quantize_blocks(a, "int8", block_a), quantize_blocks(b, "int8", block_b)
        return int8_mm(qa, qb).float() * sa * sb.view(1, -1)
    return fake_quantize(a, formats[0], block_a) @ fake_quantize(b, formats[1], block_b).t()


class _Matmul8(torch.autograd.Function):
    """``x @ w.T`` for ``x`` ``(M, K)``, ``w`` ``(N, K)``, all three GEMMs in 8 bits (wgrad in fp32 for INT8)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, recipe: str, grad_format: str) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.recipe, ctx.grad_format = recipe, grad_format
        return gemm(x, "activation", w, "weight", recipe, "forward")

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        recipe, formats = ctx.recipe, (ctx.grad_format, "fp8_e4m3")
        dx = gemm(dy, "activation", w.t(), "weight", recipe, "dgrad", formats) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            if recipe == "int8":
                dw = dy.t().float() @ x.float()
            else:                                           # reduction over tokens: tiles run along them
                dw = gemm(dy.t(), "activation", x.t(), "activation", recipe, "wgrad", formats)
        return dx, dw, None, None


def matmul8(x: torch.Tensor, w: torch.Tensor, recipe: str, grad_format: str = "fp8_e4m3") -> torch.Tensor:
    """``x @ w.T`` for ``x`` ``(..., K)`` and ``w`` ``(N, K)`` with 8-bit GEMMs forward and backward; the output
    gradient in ``grad_format`` (E4M3 as DeepSeek-V3, or E5M2's wider range as torchao's tensorwise recipe)."""
    _check_recipe(recipe)
    if grad_format not in GRAD_FORMATS:
        raise ValueError(f"grad_format = {grad_format!r} is not allowed; allowed: {', '.join(map(repr, GRAD_FORMATS))}")
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features and w {w.shape[-1]} columns; allowed: the same K")
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 0:                                   # no rows (an expert nobody chose): nothing to scale
        return (flat @ w.t()).view(*x.shape[:-1], w.shape[0])
    return _Matmul8.apply(flat, w, recipe, grad_format).view(*x.shape[:-1], w.shape[0])


class Linear8(nn.Linear):
    """``nn.Linear`` (no bias) whose GEMMs run in 8 bits under ``recipe``; the weight stays an fp32 master copy."""

    def __init__(self, in_features: int, out_features: int, recipe: str, grad_format: str = "fp8_e4m3"):
        _check_recipe(recipe)
        super().__init__(in_features, out_features, bias=False)
        self.recipe, self.grad_format = recipe, grad_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul8(x, self.weight, self.recipe, self.grad_format)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe!r}, grad_format={self.grad_format!r}"


class Experts8(Experts):
    """:class:`moelab.ffn.Experts` whose matmuls run in 8 bits under ``recipe``, one expert at a time (there is
    no grouped 8-bit GEMM on a CPU); the stacked ``(E, K, N)`` weights are the fp32 master copies."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, recipe: str, grad_format: str = "fp8_e4m3"):
        _check_recipe(recipe)
        super().__init__(n_experts, d_model, d_expert)
        self.recipe, self.grad_format = recipe, grad_format

    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return matmul8(x, w.t(), self.recipe, self.grad_format)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self._mm(F.silu(self._mm(x, self.w_gate[e])) * self._mm(x, self.w_up[e]), self.w_down[e])

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        starts = [0, *offsets.tolist()[:-1]]
        rows = [self.expert(e, x[s:end]) for e, (s, end) in enumerate(zip(starts, offsets.tolist()))]
        return torch.cat(rows) * scale[:, None]


def convert(model: nn.Module, recipe: str, grad_format: str = "fp8_e4m3",
            skip: tuple[str, ...] = ("output", "router")) -> nn.Module:
    """Swap, in place, every ``nn.Linear`` without bias and every :class:`Experts` of ``model`` for its 8-bit twin
    with the same weights; modules named in ``skip`` (and what is inside them) stay as they are: the output head
    and the routers, kept in higher precision as in DeepSeek-V3. Returns ``model``."""
    _check_recipe(recipe)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if set(full.split(".")) & set(skip) or isinstance(child, (Linear8, Experts8)):
                continue
            if type(child) is nn.Linear and child.bias is None:
                new = Linear8(child.in_features, child.out_features, recipe, grad_format)
            elif type(child) is Experts:
                new = Experts8(child.n_experts, child.d_model, child.d_expert, recipe, grad_format)
            else:
                continue
            new.load_state_dict(child.state_dict())
            setattr(parent, name, new.to(next(child.parameters()).device))
    return model


class AdamW(torch.optim.Optimizer):
    """AdamW over fp32 master weights with its two moments stored in ``moment_dtype`` (BF16 in DeepSeek-V3, which
    found no loss of accuracy; fp32 is torch's): the update is computed in fp32, then the moments are rounded."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, moment_dtype: torch.dtype = torch.bfloat16):
        if moment_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"moment_dtype = {moment_dtype} is not allowed; allowed: torch.bfloat16, torch.float32")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                state["step"] += 1
                t = state["step"]
                m = state["exp_avg"].float().mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))
        return loss
