"""Fast training kernels in plain PyTorch: fused "4-bit base + LoRA" linear and a chunked LM loss.

Why: profiled on a 2-core bf16 CPU, a QLoRA step through bitsandbytes + separate LoRA modules spent
a fifth of its time on copies and dtype casts, and the loss materialised fp32 logits for the whole
sequence (4*T*V bytes, more than the activations of all checkpointed blocks together).

- ``Lora4bitLinear`` dequantizes the NF4/FP4 weight to the compute dtype (bf16, or fp32 on CPUs
  without bf16 kernels) once per call, does one matmul for the base and two thin ones for the adapter, and stores no weight for backward: the backward
  dequantizes again, except in a checkpointed block: there the weight dequantized by the recompute
  is kept until its backward a moment later (one dequantization per layer and step saved, for one
  block's worth of dequantized weights).
- ``chunked_causal_lm_loss`` computes the cross-entropy chunk by chunk and its input gradient in the
  same pass, so only one chunk of fp32 logits ever exists.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_lite.kernels.bnb_import import functional as F


def _in_checkpoint() -> bool:
    """True inside a non-reentrant checkpointed block (its forward or its recompute).

    There, a saved tensor costs nothing in the forward (the checkpoint stores only a placeholder)
    and lives from the recompute to its backward a moment later.
    """
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, RuntimeError, TypeError):
        return False
    name = getattr(hooks[0], "__qualname__", "") if hooks else ""
    return name.startswith(("_checkpoint_hook", "_recomputation_hook"))


def dequantize_4bit_computed(weight) -> torch.Tensor:
    """A ``bnb.nn.Params4bit`` as a (out, in) tensor in its compute dtype (bf16 or fp32: straight from
    the 4-bit codes, no intermediate copy)."""
    return F.dequantize_4bit(weight.data, weight.quant_state)


class Lora4bitLinear(torch.autograd.Function):
    """``y = x @ W^T + bias + scaling * (lora_x @ A^T) @ B^T`` with W stored in 4-bit.

    Shapes: x, lora_x (N, in); W (out, in); A (r, in); B (out, r); y (N, out). The base is frozen:
    no gradient for W or bias. ``lora_x`` is x after LoRA dropout (the same tensor without dropout).
    """

    @staticmethod
    def forward(ctx, x, lora_x, lora_A, lora_B, base, scaling):
        shared = lora_x is None  # no dropout: the adapter sees x itself
        weight, bias = base.weight, base.bias  # passed as the module: Params4bit must not be unwrapped
        w = dequantize_4bit_computed(weight)
        y = nn.functional.linear(x, w, bias)
        xa = (x if shared else lora_x) @ lora_A.t()  # (N, r)
        y = torch.addmm(y, xa, lora_B.t(), alpha=scaling)  # not in place: checkpointing may cache y
        ctx.weight, ctx.scaling, ctx.shared = weight, scaling, shared
        ctx.save_for_backward(x, lora_x, lora_A, lora_B, xa, w if _in_checkpoint() else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_x, lora_A, lora_B, xa, w = ctx.saved_tensors
        s = ctx.scaling
        gb = grad_y @ lora_B  # (N, r)
        grad_x = grad_lora_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            w = dequantize_4bit_computed(ctx.weight) if w is None else w
            grad_x = grad_y @ w  # (N, in)
            if ctx.shared:
                grad_x.addmm_(gb, lora_A, alpha=s)
        if ctx.needs_input_grad[1]:
            grad_lora_x = (gb @ lora_A).mul_(s)
        if ctx.needs_input_grad[2]:
            grad_A = (gb.t() @ (x if ctx.shared else lora_x)).mul_(s)  # (r, in)
        if ctx.needs_input_grad[3]:
            grad_B = (grad_y.t() @ xa).mul_(s)  # (out, r)
        return grad_x, grad_lora_x, grad_A, grad_B, None, None


def fast_lora_applies(layer, x: torch.Tensor) -> bool:
    """Whether ``lora_4bit_forward`` computes ``layer(x)``: a trainable, unmerged LoRA over a bnb
    4-bit layer in canonical layout, with x, A, B and the compute dtype all the same float type."""
    weight = getattr(layer.base_layer, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False) or layer.merged:
        return False
    if not (layer.training and torch.is_grad_enabled()):
        return False
    if getattr(layer, "use_dora", False) and not isinstance(layer.lora_dropout, nn.Identity):
        return False  # DoRA's base term sees the dropped input: the plain path computes it
    return x.dtype == layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == state.dtype


def lora_4bit_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The LoRALinear forward through ``Lora4bitLinear``; x (..., in) -> (..., out)."""
    lora_x = layer.lora_dropout(x)
    flat = x.reshape(-1, x.shape[-1])
    y = Lora4bitLinear.apply(
        flat, None if lora_x is x else lora_x.reshape(flat.shape), layer.lora_A.weight, layer.lora_B.weight,
        layer.base_layer, layer.scaling,
    )
    return y.reshape(*x.shape[:-1], y.shape[-1])
