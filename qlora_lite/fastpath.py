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

from .memory import CHUNKED_LOSS_MODELS as SUPPORTED_LOSS_MODELS
from .memory import loss_chunk_for

# Switch for comparisons (tests, profiling): False sends every LoRA layer through the plain path.
ENABLED = True


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
    import bitsandbytes.functional as F

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
    if not ENABLED:
        return False
    weight = getattr(layer.base_layer, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False) or layer.merged:
        return False
    if not (layer.training and torch.is_grad_enabled()):
        return False
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


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of ``hidden @ weight^T``, one chunk of logits at a time.

    The input gradient is computed in the forward (softmax minus one-hot, times the head), so the
    backward only scales it: no logits are kept and none are recomputed. Shapes: hidden (N, H),
    weight (V, H), labels (N,) with ``ignore_index`` for tokens outside the loss. The head is frozen.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, ignore_index):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            logits = (h @ weight.t()).float()  # (c, V): the only logits alive
            valid = y != ignore_index
            target = y.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, target).squeeze(1)) * valid).sum()
            if grad is not None:
                probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                probs.scatter_add_(1, target, -torch.ones_like(target, dtype=probs.dtype))
                probs.mul_(valid.unsqueeze(1))
                grad[start:start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The next-token cross-entropy, as ``model(..., labels=labels).loss`` computes it (``reduction=
    "mean"``) or summed over the tokens that count (``"sum"``), without materialising (B, T, V) logits.

    Args:
        hidden_states: (B, T, H) final hidden states (after the last norm).
        lm_head_weight: (V, H) output head (frozen; it gets no gradient).
        labels: (B, T) token ids; position t is predicted from hidden state t-1 (shifted here);
            ``ignore_index`` marks tokens outside the loss.
        chunk: tokens per chunk (default ``memory.loss_chunk_for(V)``); peak extra memory is about
            10 * chunk * V bytes.

    Returns:
        A scalar fp32 loss: the mean over the tokens that count (0 when none count), or their sum.
    """
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    chunk = chunk or loss_chunk_for(lm_head_weight.shape[0])
    total = _ChunkedCrossEntropy.apply(hidden, lm_head_weight.detach(), targets, chunk, ignore_index)
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


def _is_fsdp_root(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether the model's logits are a plain ``hidden @ lm_head^T`` (no bias, scale or soft-capping)."""
    config = getattr(model, "config", None)  # None for wrappers such as DDP: their forward must run
    if config is None or _is_fsdp_root(model):  # FSDP unshards the root's weights in its own forward
        return False
    head = model.get_output_embeddings()
    return (config.model_type in SUPPORTED_LOSS_MODELS and isinstance(head, nn.Linear)
            and head.bias is None and not getattr(config, "final_logit_softcapping", None)
            and getattr(config, "logit_scale", None) in (None, 1, 1.0))


def causal_lm_loss(model: nn.Module, input_ids, labels, attention_mask=None, chunk: int | None = None,
                   reduction: str = "mean", **inputs) -> torch.Tensor:
    """The training loss of a causal LM; chunked (no full logits) when the architecture allows it.

    Args:
        input_ids, labels: (B, T); labels use -100 for tokens outside the loss.
        attention_mask: (B, T) or None; further ``inputs`` (e.g. position_ids) go to the model.
        reduction: "mean" over the tokens that count, or "sum".

    Returns:
        Scalar loss equal (to bf16 rounding) to ``model(input_ids, attention_mask, labels=labels).loss``
        (times the token count for "sum").
    """
    if supports_chunked_loss(model):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                  **inputs).last_hidden_state
        return chunked_causal_lm_loss(hidden, model.get_output_embeddings().weight, labels, chunk,
                                      reduction=reduction)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                       ignore_index=-100, reduction=reduction)


def _attention_ops() -> set:
    from . import cpu_attention  # noqa: F401  (registers torch.ops.qlora_lite.causal_attention)

    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    ops = {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}
    return ops | {torch.ops.qlora_lite.causal_attention.default}


def selective_checkpoint_context(policy: str = "balanced"):
    """A ``context_fn`` for non-reentrant checkpointing: keep what is cheap to store and costly to
    recompute, recompute the rest of the block.

    ``policy="speed"`` keeps every projection output too (all matmuls whose weight is at least 64
    wide, i.e. not the thin LoRA ones): the recomputed forward then does no big matmul. On the 1.1B
    benchmark (CPU, 512 tokens) steps took 15% less time than balanced for 0.36 GB more peak memory.

    Kept: attention outputs (the fused attention kernel was a tenth of a CPU step; (B, T, H) per
    block) and the outputs of down-projections, matmuls whose input is at least twice as wide as
    their output (the MLP's down_proj: 5632 -> 2048 at 1.1B, a quarter of the block's FLOPs for one
    (B, T, H) tensor). Policy is by op and shape, so it holds for every architecture.
    """
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = _attention_ops()
    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}

    def decide(ctx, op, *args, **kwargs):  # named apart from ``policy``, which it reads
        if op in keep:
            return CheckpointPolicy.MUST_SAVE
        if op in matmuls:
            weight = args[-1]  # (in, out) view of the weight
            wide = weight.dim() == 2 and min(weight.shape) >= 64
            if wide and (policy == "speed" or weight.shape[0] >= 2 * weight.shape[1]):
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(decide)
