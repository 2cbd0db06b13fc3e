"""The LM loss computed chunk by chunk: only one chunk of fp32 logits ever exists.

``chunked_causal_lm_loss`` computes the cross-entropy of a chunk of tokens and its input gradient in
the same pass; the head's logits for the whole sequence (4*T*V bytes in fp32) are never materialised.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_lite.kernels.footprint import CHUNKED_LOSS_MODELS, IGNORE_INDEX, loss_chunk_for


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
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """The next-token cross-entropy, as ``model(..., labels=labels).loss`` computes it (``reduction=
    "mean"``) or summed over the tokens that count (``"sum"``), without materialising (B, T, V) logits.

    Args:
        hidden_states: (B, T, H) final hidden states (after the last norm).
        lm_head_weight: (V, H) output head (frozen; it gets no gradient).
        labels: (B, T) token ids; position t is predicted from hidden state t-1 (shifted here);
            ``ignore_index`` marks tokens outside the loss.
        chunk: tokens per chunk (default ``kernels.chunked_loss.loss_chunk_for(V)``); peak extra memory is about
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
        from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415 (torch builds without FSDP2)
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether the model's logits are a plain ``hidden @ lm_head^T`` (no bias, scale or soft-capping)."""
    config = getattr(model, "config", None)  # None for wrappers such as DDP: their forward must run
    if config is None or _is_fsdp_root(model):  # FSDP unshards the root's weights in its own forward
        return False
    head = model.get_output_embeddings()
    return (config.model_type in CHUNKED_LOSS_MODELS and isinstance(head, nn.Linear)
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
                                       ignore_index=IGNORE_INDEX, reduction=reduction)
